"""Retrieval benchmark: build time, single-query latency, batch throughput and recall against exact search.

    python benchmarks/bench_retrieval.py --sizes 100000 --threads 1     # CPU: GalleryIndex (faiss Flat, torch, IVF-PQ)
    python benchmarks/bench_retrieval.py --device cuda                  # GPU: torch fp16 exact (+ faiss-gpu if installed)
    python benchmarks/bench_retrieval.py --tiny                         # seconds (smoke run)

The gallery is synthetic but shaped like image embeddings (see ``synthetic_gallery``): items near a 64-d
subspace, grouped into concepts of 8 near-variants, grouped into topics, plus isotropic noise; queries are new
draws around random concepts. Vectors are L2-normalised and searched by inner product (cosine), as the index does.

CPU: every row searches through ``GalleryIndex`` (what ``diffusers-cir search`` and the evaluation run): exact
search on faiss ``Flat`` (the CPU default), the same index mirrored to the torch backend (``index.to("cpu",
backend="torch")``), and IVF-PQ at each ``--nprobe``. Each is timed at one query per call (single-query latency)
and at all ``--queries`` in one call (batch throughput), with a warm-up round and ``--repeats`` rounds interleaved
across the backends (medians; the thread count is set explicitly, default 1).

Recall is measured against exact float32 search of the same queries:
- ``top1_in_top10``: fraction of queries whose exact top-1 is among the 10 results (the CIR Recall@10 when the
  target is the exact nearest neighbour);
- ``set_recall@10``: mean |top-10 ∩ exact top-10| / 10 (the overlap of the two top-10 sets).

Prints a table and writes JSON: full-size CPU runs under ``benchmarks/results/<machine label>/retrieval_cpu.json``,
``--tiny`` runs under ``benchmarks/results/tiny/``; ``--output`` overrides both.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import _harness as harness
import numpy as np
import torch

from diffusers_cir.retrieval.backends import faiss_gpu_count, torch_exact_search


def synthetic_gallery(num_items: int, dim: int, num_queries: int, seed: int = 0, chunk: int = 100_000):
    """Normalised float32 gallery [num_items, dim] and queries [num_queries, dim], generated in chunks."""
    rng = np.random.default_rng(seed)
    rank, per_concept, num_topics = 64, 8, 1000
    num_concepts = max(1, num_items // per_concept)
    basis = rng.normal(size=(rank, dim)).astype(np.float32) / np.sqrt(rank)
    topics = rng.normal(size=(num_topics, rank)).astype(np.float32)
    concepts = topics[rng.integers(0, num_topics, num_concepts)] + rng.normal(size=(num_concepts, rank)).astype(np.float32)
    noise = 0.125 * np.sqrt(256 / dim)  # the same signal-to-noise ratio at any width

    def draw(concept_ids, generator):
        latent = concepts[concept_ids] + 0.5 * generator.normal(size=(len(concept_ids), rank)).astype(np.float32)
        vectors = latent @ basis + noise * generator.normal(size=(len(concept_ids), dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    gallery = np.empty((num_items, dim), dtype=np.float32)
    for start in range(0, num_items, chunk):
        stop = min(num_items, start + chunk)
        gallery[start:stop] = draw(np.arange(start, stop) // per_concept % num_concepts, np.random.default_rng([seed, start]))
    queries = draw(rng.integers(0, num_concepts, num_queries), np.random.default_rng([seed, num_items + 1]))
    return gallery, queries.astype(np.float32)


def synthetic_gallery_torch(num_items: int, dim: int, num_queries: int, seed: int = 0, device="cuda"):
    """``synthetic_gallery`` drawn with torch on the GPU (same model, other random numbers): seconds, not a minute,
    for 1M x 768, which matters on a metered GPU lease."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    rank, per_concept, num_topics = 64, 8, 1000
    num_concepts = max(1, num_items // per_concept)
    basis = normal(rank, dim) / math.sqrt(rank)
    topics = normal(num_topics, rank)
    topic_of = torch.randint(0, num_topics, (num_concepts,), generator=generator, device=device)
    concepts = topics[topic_of] + normal(num_concepts, rank)
    noise = 0.125 * math.sqrt(256 / dim)

    def draw(concept_ids):
        latent = concepts[concept_ids] + 0.5 * normal(len(concept_ids), rank)
        return torch.nn.functional.normalize(latent @ basis + noise * normal(len(concept_ids), dim), dim=-1)

    gallery = draw(torch.arange(num_items, device=device) // per_concept % num_concepts)
    queries = draw(torch.randint(0, num_concepts, (num_queries,), generator=generator, device=device))
    return gallery.cpu().numpy(), queries.cpu().numpy()


def recall_metrics(found: np.ndarray, exact: np.ndarray) -> dict:
    """`top1_in_top10`: the exact top-1 is among the 10 found; `set_recall@10`: |found top-10 ∩ exact top-10| / 10."""
    top1_found = np.mean([exact[i, 0] in found[i, :10] for i in range(len(exact))])
    overlap = np.mean([len(set(found[i, :10].tolist()) & set(exact[i, :10].tolist())) / 10 for i in range(len(exact))])
    return {"top1_in_top10": float(top1_found), "set_recall@10": float(overlap)}


def auto_nlist(num_items: int) -> int:
    # ~sqrt(N) lists, a power of two: cheap to train on 2 CPU cores (faiss suggests 4-16 sqrt(N) for speed).
    return 2 ** int(round(math.log2(math.sqrt(num_items))))


def _search(entry, queries: np.ndarray, k: int):
    index, parameters = entry
    if parameters:  # indexes sharing one IVF index differ only in their search parameters
        index.set_search_parameters(**parameters)
    return index.search(queries, k=k, batch_size=len(queries), show_progress=False)


def _timed_searches(indexes: dict, queries: np.ndarray, k: int, repeats: int, single_queries: int) -> dict:
    """Per index: milliseconds of one search of a single query and of one batched search of all queries, in
    rounds interleaved across the indexes (every index answers the same single query in a round)."""
    cpu = torch.device("cpu")
    single_samples: dict[str, list[float]] = {name: [] for name in indexes}
    for row in range(single_queries):
        one = queries[row : row + 1]
        functions = {name: (lambda entry=entry: _search(entry, one, k)) for name, entry in indexes.items()}
        for name, values in harness.interleaved(functions, cpu, repeats).items():
            single_samples[name].extend(values)
    functions = {name: (lambda entry=entry: _search(entry, queries, k)) for name, entry in indexes.items()}
    return {"single": single_samples, "batch": harness.interleaved(functions, cpu, repeats)}


def bench_cpu(args, num_items, gallery, queries, rows):
    from diffusers_cir.retrieval import GalleryIndex

    k, exact_name = args.k, "Flat (faiss, exact)"
    indexes, builds = {}, {}
    # Exact search through GalleryIndex (faiss Flat: the CPU default), and the same index on the torch backend.
    start = time.perf_counter()
    flat = GalleryIndex(gallery.shape[1], factory="Flat")
    flat.add(gallery, show_progress=False)
    builds[exact_name] = {"build_s": time.perf_counter() - start}
    indexes[exact_name] = (flat, None)
    torch_flat = GalleryIndex(gallery.shape[1], factory="Flat")
    torch_flat.add(gallery, show_progress=False)
    start = time.perf_counter()
    torch_flat.to("cpu", backend="torch")
    builds["Flat (torch backend, exact)"] = {"build_s": time.perf_counter() - start}
    indexes["Flat (torch backend, exact)"] = (torch_flat, None)

    nlist = args.nlist or auto_nlist(num_items)
    factory = f"IVF{nlist},PQ{args.pq_m}"
    train_size = min(num_items, max(64 * nlist, 1 << 14))
    sample = gallery[np.random.default_rng(1).choice(num_items, train_size, replace=False)]
    ivf = GalleryIndex(gallery.shape[1], factory=factory)
    start = time.perf_counter()
    ivf.train(sample)
    train = time.perf_counter() - start
    start = time.perf_counter()
    ivf.add(gallery, show_progress=False)
    add = time.perf_counter() - start
    for nprobe in args.nprobe:
        indexes[f"{factory} nprobe={nprobe}"] = (ivf, {"nprobe": nprobe})
        builds[f"{factory} nprobe={nprobe}"] = {"build_s": train + add, "train_s": train, "add_s": add,
                                               "train_size": train_size}

    exact = _search(indexes[exact_name], queries, k).positions
    timings = _timed_searches(indexes, queries, k, args.repeats, args.single_queries)
    medians = {kind: {name: statistics.median(values) for name, values in samples.items()}
               for kind, samples in timings.items()}
    for name, entry in indexes.items():
        found = _search(entry, queries, k).positions
        single_ms, batch_ms = medians["single"][name], medians["batch"][name]
        rows.append(dict(
            n=num_items, dim=gallery.shape[1], backend="GalleryIndex cpu", factory=name, threads=args.threads,
            **builds[name], single_query_ms=round(single_ms, 4),
            single_query_ratio_to_exact=round(single_ms / medians["single"][exact_name], 4),
            batch_queries=len(queries), batch_ms=round(batch_ms, 3), qps=len(queries) / batch_ms * 1000,
            batch_ratio_to_exact=round(batch_ms / medians["batch"][exact_name], 4), search_s=batch_ms / 1000,
            **recall_metrics(found, exact), single_query_samples_ms=[round(v, 4) for v in timings["single"][name]],
            batch_samples_ms=[round(v, 3) for v in timings["batch"][name]]))
    return exact


def _cuda_time(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / 1000)
    return times


def bench_cuda(args, num_items, gallery, queries, rows):
    k = args.k
    device = torch.device("cuda")
    start = time.perf_counter()
    gallery32 = torch.from_numpy(gallery).to(device)
    torch.cuda.synchronize()
    upload = time.perf_counter() - start
    queries32 = torch.from_numpy(queries).to(device)
    # Exact float32 reference on the GPU (tf32 off: a true float32 product).
    torch.backends.cuda.matmul.allow_tf32 = False
    _, exact = torch_exact_search(queries32, gallery32, k, gallery_chunk_size=1 << 18)
    exact = exact.cpu().numpy()
    times = _cuda_time(lambda: torch_exact_search(queries32, gallery32, k, gallery_chunk_size=1 << 18), args.repeats)
    rows.append(dict(n=num_items, backend="torch-cuda", factory="exact fp32", params="chunk=262144",
                     build_s=upload, search_s=statistics.median(times), qps=len(queries) / statistics.median(times),
                     **recall_metrics(exact, exact)))
    gallery16 = gallery32.half()
    del gallery32
    queries16 = queries32.half()
    for chunk in args.chunks:
        chunk_size = None if chunk == 0 else chunk
        for block_gib in args.score_block_gib:
            block = int(block_gib * (1 << 30))

            def search():
                return torch_exact_search(queries16, gallery16, k, gallery_chunk_size=chunk_size, score_block_bytes=block)

            times = _cuda_time(search, args.repeats)
            found = search()[1].cpu().numpy()
            rows.append(dict(n=num_items, backend="torch-cuda", factory="exact fp16",
                             params=f"chunk={chunk_size or num_items} block={block_gib}GiB", build_s=upload,
                             search_s=statistics.median(times), search_s_min=min(times),
                             qps=len(queries) / statistics.median(times), **recall_metrics(found, exact)))
    # End to end through GalleryIndex (numpy queries in, numpy results out; the index mirrors its Flat part).
    try:
        from diffusers_cir.retrieval import GalleryIndex

        index = GalleryIndex(gallery.shape[1], factory="Flat")
        index.add(gallery, show_progress=False)
        start = time.perf_counter()
        index.to("cuda", backend="torch")
        torch.cuda.synchronize()
        mirror = time.perf_counter() - start
        index.search(queries, k=k, batch_size=len(queries))  # warm-up
        times = []
        for _ in range(max(3, args.repeats // 4)):
            start = time.perf_counter()
            found = index.search(queries, k=k, batch_size=len(queries)).positions
            times.append(time.perf_counter() - start)
        rows.append(dict(n=num_items, backend="GalleryIndex torch-cuda", factory="Flat", params="host<->device incl.",
                         build_s=mirror, search_s=statistics.median(times), qps=len(queries) / statistics.median(times),
                         **recall_metrics(found, exact)))
        del index
    except ImportError as error:  # faiss not installed on this machine
        print(f"(GalleryIndex end-to-end row skipped: {error})", file=sys.stderr)
    del gallery16
    torch.cuda.empty_cache()

    if faiss_gpu_count() > 0:
        import faiss

        resources = faiss.StandardGpuResources()
        start = time.perf_counter()
        flat = faiss.GpuIndexFlatIP(resources, gallery.shape[1])
        flat.add(gallery)
        build = time.perf_counter() - start
        flat.search(queries, k)
        start = time.perf_counter()
        _, found = flat.search(queries, k)
        seconds = time.perf_counter() - start
        rows.append(dict(n=num_items, backend="faiss-gpu", factory="Flat", params="", build_s=build, search_s=seconds,
                         qps=len(queries) / seconds, **recall_metrics(found, exact)))
    return exact


def print_table(rows):
    header = (f"{'N':>9} {'backend':<24} {'index':<34} {'params':<26} {'build s':>8} {'1-query ms':>10} "
              f"{'batch ms':>10} {'queries/s':>10} {'top1_in_top10':>13} {'set_recall@10':>13}")
    print(header)
    print("-" * len(header))
    for row in rows:
        single = f"{row['single_query_ms']:>10.3f}" if "single_query_ms" in row else f"{'-':>10}"
        print(
            f"{row['n']:>9} {row['backend']:<24} {row['factory']:<34} {row.get('params', ''):<26} "
            f"{row['build_s']:>8.2f} {single} {row['search_s'] * 1000:>10.2f} {row['qps']:>10.0f} "
            f"{row['top1_in_top10']:>13.3f} {row['set_recall@10']:>13.3f}"
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="A 2,000-item gallery of width 64 on CPU (seconds).")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="Gallery sizes (default 100000 1000000).")
    parser.add_argument("--dim", type=int, default=None, help="Embedding width (default 768: CLIP ViT-L/14).")
    parser.add_argument("--queries", type=int, default=None, help="Queries of the batch search (default 1024).")
    parser.add_argument("--single-queries", type=int, default=None,
                        help="CPU: distinct queries timed one per search (default 16).")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: ~sqrt(N), a power of two).")
    parser.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantizers = bytes per vector (default dim/8).")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for faiss and torch (default 1: on a shared machine more can be slower).")
    parser.add_argument("--nprobe", type=int, nargs="+", default=None, help="IVF lists visited (default 8 32).")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 1 << 18], help="GPU gallery chunks (0: all).")
    parser.add_argument("--score-block-gib", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--repeats", type=int, default=None,
                        help="Timed rounds after one warm-up round (median reported; default CPU 5, GPU 20).")
    parser.add_argument("--machine-label", default=None, help="Results sub-folder (default: from the CPU or GPU name).")
    parser.add_argument("--output", default=None, help="JSON file (default: results/<label>/retrieval_<device>.json).")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device = "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU.")
    args.sizes = args.sizes or ([2000] if args.tiny else [100_000, 1_000_000])
    args.dim = args.dim or (64 if args.tiny else 768)
    args.queries = args.queries or (64 if args.tiny else 1024)
    args.single_queries = args.single_queries or (4 if args.tiny else 16)
    args.nprobe = args.nprobe or ([4] if args.tiny else [8, 32])
    args.repeats = args.repeats or (2 if args.tiny else 5 if args.device == "cpu" else 20)
    for name in ("sizes", "nprobe", "chunks"):
        if min(getattr(args, name)) < (0 if name == "chunks" else 1):
            parser.error(f"--{name} must be positive, got {getattr(args, name)}.")
    for name in ("dim", "queries", "single_queries", "k", "threads", "repeats", "nlist", "pq_m"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    if args.single_queries > args.queries:
        parser.error(f"--single-queries ({args.single_queries}) cannot exceed --queries ({args.queries}).")
    args.pq_m = args.pq_m or args.dim // 8
    if args.dim % args.pq_m:
        parser.error(f"--pq-m {args.pq_m} must divide --dim {args.dim}.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.device == "cpu":
        harness.set_threads(args.threads)
        import faiss

        faiss.omp_set_num_threads(args.threads)
    env = harness.environment(device)
    print(f"# retrieval on {env['device']} ({env['cpu']}), threads {args.threads}, load average "
          f"{env['load_average_at_start']}", flush=True)
    rows = []
    for num_items in args.sizes:
        start = time.perf_counter()
        if args.device == "cuda":
            gallery, queries = synthetic_gallery_torch(num_items, args.dim, args.queries)
        else:
            gallery, queries = synthetic_gallery(num_items, args.dim, args.queries)
        print(f"[{num_items} x {args.dim}] generated in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        if args.device == "cpu":
            bench_cpu(args, num_items, gallery, queries, rows)
        else:
            bench_cuda(args, num_items, gallery, queries, rows)
        del gallery
    print_table(rows)

    try:
        import faiss

        env["faiss"] = faiss.__version__
    except ImportError:
        env["faiss"] = None
    env["faiss_gpus"] = faiss_gpu_count() if args.device == "cuda" else 0
    output = harness.results_path(f"retrieval_{args.device}.json", args.tiny, device, args.machine_label, args.output)
    harness.write_results(output, {"benchmark": "retrieval", "machine_label": output.parent.name, "environment": env,
                                   "threads": args.threads, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
