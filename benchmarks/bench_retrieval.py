"""Retrieval benchmark: build time, queries/s and recall@10 vs exact search, for 100k and 1M galleries.

    python benchmarks/bench_retrieval.py                          # CPU: faiss Flat, faiss IVF-PQ, torch exact
    python benchmarks/bench_retrieval.py --device cuda            # GPU: torch fp16 exact (+ faiss-gpu if installed)
    python benchmarks/bench_retrieval.py --sizes 100000 --dim 256 --output /tmp/r.json

The gallery is synthetic but shaped like image embeddings (see ``synthetic_gallery``): items near a 64-d
subspace, grouped into concepts of 8 near-variants, grouped into topics, plus isotropic noise; queries are new
draws around random concepts. Vectors are L2-normalised and searched by inner product (cosine), as the index does.

Recall is measured against exact float32 search of the same queries:
- ``recall@10``: fraction of queries whose exact top-1 is among the 10 results (the CIR Recall@10 when the
  target is the exact nearest neighbour);
- ``overlap@10``: mean |top-10 ∩ exact top-10| / 10.

Prints a table and writes JSON (``--output``; default ``benchmarks/results/retrieval_<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

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
    top1_found = np.mean([exact[i, 0] in found[i, :10] for i in range(len(exact))])
    overlap = np.mean([len(set(found[i, :10].tolist()) & set(exact[i, :10].tolist())) / 10 for i in range(len(exact))])
    return {"recall@10": float(top1_found), "overlap@10": float(overlap)}


def auto_nlist(num_items: int) -> int:
    # ~sqrt(N) lists, a power of two: cheap to train on 2 CPU cores (faiss suggests 4-16 sqrt(N) for speed).
    return 2 ** int(round(math.log2(math.sqrt(num_items))))


def bench_cpu(args, num_items, gallery, queries, rows):
    import faiss

    from diffusers_cir.retrieval import GalleryIndex

    k = args.k
    # Exact search is the reference: faiss Flat (inner product on normalised vectors).
    start = time.perf_counter()
    flat = GalleryIndex(gallery.shape[1], factory="Flat")
    flat.add(gallery, show_progress=False)
    build = time.perf_counter() - start
    start = time.perf_counter()
    exact = flat.search(queries, k=k, batch_size=len(queries)).positions
    seconds = time.perf_counter() - start
    rows.append(dict(n=num_items, backend="faiss-cpu", factory="Flat", params="", build_s=build,
                     search_s=seconds, qps=len(queries) / seconds, **recall_metrics(exact, exact)))
    del flat

    # Torch exact search on the CPU (float32), chunked over the gallery like the GPU path.
    gallery_tensor = torch.from_numpy(gallery)
    query_tensor = torch.from_numpy(queries)
    start = time.perf_counter()
    _, positions = torch_exact_search(query_tensor, gallery_tensor, k, gallery_chunk_size=1 << 18)
    seconds = time.perf_counter() - start
    rows.append(dict(n=num_items, backend="torch-cpu", factory="exact fp32", params="chunk=262144", build_s=0.0,
                     search_s=seconds, qps=len(queries) / seconds, **recall_metrics(positions.numpy(), exact)))

    nlist = args.nlist or auto_nlist(num_items)
    factory = f"IVF{nlist},PQ{args.pq_m}"
    index = GalleryIndex(gallery.shape[1], factory=factory)
    train_size = min(num_items, max(64 * nlist, 1 << 14))
    sample = gallery[np.random.default_rng(1).choice(num_items, train_size, replace=False)]
    start = time.perf_counter()
    index.train(sample)
    train = time.perf_counter() - start
    start = time.perf_counter()
    index.add(gallery, show_progress=False)
    add = time.perf_counter() - start
    for nprobe in args.nprobe:
        index.set_search_parameters(nprobe=nprobe)
        start = time.perf_counter()
        found = index.search(queries, k=k, batch_size=len(queries)).positions
        seconds = time.perf_counter() - start
        rows.append(dict(n=num_items, backend="faiss-cpu", factory=factory, params=f"nprobe={nprobe} train={train_size}",
                         build_s=train + add, train_s=train, add_s=add, search_s=seconds,
                         qps=len(queries) / seconds, **recall_metrics(found, exact)))
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
    header = f"{'N':>9} {'backend':<24} {'factory':<14} {'params':<30} {'build s':>8} {'search ms':>10} {'queries/s':>11} {'R@10':>6} {'ovl@10':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['n']:>9} {row['backend']:<24} {row['factory']:<14} {row['params']:<30} {row['build_s']:>8.2f} "
            f"{row['search_s'] * 1000:>10.2f} {row['qps']:>11.0f} {row['recall@10']:>6.3f} {row['overlap@10']:>6.3f}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768, help="Embedding width (768: CLIP ViT-L/14). Default: 768.")
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: ~sqrt(N), a power of two).")
    parser.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantizers = bytes per vector (default dim/8).")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for faiss and torch (default: all).")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 1 << 18], help="GPU gallery chunks (0: all).")
    parser.add_argument("--score-block-gib", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--repeats", type=int, default=20, help="Timed GPU repetitions (median reported).")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU.")
    args.pq_m = args.pq_m or args.dim // 8
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass

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

    hardware = {
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "threads": args.threads or os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "faiss_gpus": faiss_gpu_count() if args.device == "cuda" else 0,
    }
    try:
        import faiss

        hardware["faiss"] = faiss.__version__
    except ImportError:
        hardware["faiss"] = None
    output = Path(args.output or Path(__file__).parent / "results" / f"retrieval_{args.device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"hardware": hardware, "args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
