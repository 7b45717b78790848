#!/usr/bin/env python
"""Data throughput: streaming triplets, embedding precomputation, and the synthetic world.

Measured (median of ``--repeats`` runs after one warm-up, on a temporary dataset built here):

- ``stream images``: rows/s through ``load_triplet_stream`` + ``build_triplet_dataloader`` from Parquet shards of
  JPEGs (``--image_size`` px, photo-like content): two images decoded and CLIP-preprocessed to 224x224 per row,
  modification text tokenised, batches collated; for each ``--num_workers``;
- ``stream embeddings``: the same for the ``embeddings`` configuration (768-wide float32 vectors);
- ``precompute``: images/s of ``precompute_embeddings`` (decode, preprocess, encode, L2-normalise, write Parquet)
  with a random-weight ``CLIPVisionModelWithProjection`` shaped like ``--encoder`` (ViT-B/32 or ViT-L/14; no
  download) on ``--device``;
- ``synthetic``: seconds to build the default 2,400-item world, to draw 100k training triplets, and to write
  100k triplets in the embeddings layout.

    python benchmarks/bench_data.py                                   # CPU, ViT-B/32-shaped encoder
    python benchmarks/bench_data.py --device cuda --encoder vit-l-14 --precompute_only
    python benchmarks/bench_data.py --quick                           # seconds: smoke test of this script

Prints a table and writes JSON (``benchmarks/results/data_<device>.json`` by default).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ENCODERS = {
    # CLIP vision towers (transformers configs); random weights: throughput does not depend on their values.
    "vit-b-32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=32, projection_dim=512),
    "vit-l-14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=768),
    "tiny": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                 image_size=224, patch_size=32, projection_dim=16),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="Triplets in the images configuration. Default: 512.")
    parser.add_argument("--embedding_rows", type=int, default=16384,
                        help="Triplets in the embeddings configuration (large: worker start-up is per epoch). Default: 16384.")
    parser.add_argument("--image_size", type=int, default=512, help="Side of the stored JPEGs. Default: 512.")
    parser.add_argument("--num_workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="vit-b-32")
    parser.add_argument("--precompute_rows", type=int, default=128, help="Rows (x2 images) to encode. Default: 128.")
    parser.add_argument("--precompute_only", action="store_true")
    parser.add_argument("--skip_synthetic", action="store_true")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, one repeat (smoke test).")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.embedding_rows, args.image_size, args.num_workers, args.repeats = 32, 32, 128, [0], 1
        args.encoder, args.precompute_rows, args.skip_synthetic = "tiny", 16, True
    if args.output_json is None:
        suffix = "_quick" if args.quick else ""
        args.output_json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"data_{args.device}{suffix}.json")
    return args


def photo_like_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth colour field plus texture: compresses like a photo (random noise would not)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x * rng.random() + rng.random() * 6), np.cos(5 * y * rng.random()), x * y], -1)
    image = (base * 0.5 + 0.5) * 200 + rng.normal(0, 12, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def build_dataset(folder: str, rows: int, image_size: int, embedding_dim: int = 768, embedding_rows: int | None = None) -> dict:
    from diffusers_cir.data.schema import embeddings_features, images_features
    from diffusers_cir.data.shards import ParquetShardWriter, record_split

    rng = np.random.default_rng(0)
    pool = [photo_like_jpeg(rng, image_size) for _ in range(32)]  # reused: encoding JPEGs is not what we measure
    shard_rows = max(1, rows // 8)
    with ParquetShardWriter(folder, "images", "train", images_features(), rows_per_shard=shard_rows, row_group_size=32) as writer:
        for i in range(rows):
            writer.add({"id": f"row-{i:06d}", "reference_image": {"bytes": pool[i % 32], "path": None},
                        "target_image": {"bytes": pool[(i * 7 + 3) % 32], "path": None},
                        "modification_text": f"make it look like picture number {i}", "reference_caption": None,
                        "target_caption": f"picture number {i}"})
    record_split(folder, "images", images_features(), "train", rows, default=True)
    rows = embedding_rows or rows
    shard_rows = max(1, rows // 8)
    vectors = rng.standard_normal((rows, embedding_dim)).astype(np.float32)
    with ParquetShardWriter(folder, "embeddings", "train", embeddings_features(embedding_dim), rows_per_shard=shard_rows) as writer:
        writer.add_batch({"id": [f"row-{i:06d}" for i in range(rows)], "reference_image_embeds": vectors,
                          "target_image_embeds": vectors[::-1].copy(),
                          "modification_text": [f"make it look like picture number {i}" for i in range(rows)],
                          "reference_caption": [None] * rows, "target_caption": [f"picture number {i}" for i in range(rows)]})
    record_split(folder, "embeddings", embeddings_features(embedding_dim), "train", rows)
    return {"jpeg_kib": round(float(np.mean([len(b) for b in pool])) / 1024, 1)}


def time_stream(folder: str, config: str, batch_size: int, num_workers: int, repeats: int) -> dict:
    from diffusers_cir.data.streaming import build_triplet_dataloader, load_triplet_stream

    stream = load_triplet_stream(folder, config, split="train")
    timings, rows = [], 0
    for repeat in range(repeats + 1):  # the first pass warms caches and the worker start-up path
        loader = build_triplet_dataloader(stream, batch_size=batch_size, num_workers=num_workers, shuffle_buffer_size=64)
        loader.set_epoch(repeat)
        start = time.perf_counter()
        rows = sum(len(batch["ids"]) for batch in loader)
        if repeat:
            timings.append(time.perf_counter() - start)
    seconds = statistics.median(timings)
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1)}


def time_precompute(folder: str, encoder: str, device: str, rows: int, batch_size: int, num_workers: int) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from diffusers_cir.data.precompute import precompute_embeddings, transformers_embedder
    from diffusers_cir.data.shards import reshard

    source = os.path.join(folder, "precompute")
    reshard(folder, "images", "train", rows_per_shard=rows, output_folder=source, progress=False)
    first, *extras = sorted(os.listdir(os.path.join(source, "images")))
    for extra in extras:  # keep one shard of `rows` rows, named as a complete set of one
        os.remove(os.path.join(source, "images", extra))
    os.replace(os.path.join(source, "images", first), os.path.join(source, "images", "train-00000-of-00001.parquet"))
    model_folder = os.path.join(folder, f"encoder-{encoder}")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODERS[encoder])).save_pretrained(model_folder)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    embedder = transformers_embedder(model_folder, device=device, dtype=dtype)
    with torch.no_grad():  # warm-up (CUDA kernels, allocator)
        embedder.encode(torch.zeros(2, 3, 224, 224))
    out = os.path.join(folder, "precompute-out")
    summary = precompute_embeddings(source, embedder, output_folder=out, batch_size=batch_size,
                                    num_workers=num_workers, progress=False)
    parameters = sum(p.numel() for p in CLIPVisionModelWithProjection.from_pretrained(model_folder).parameters())
    return {"encoder": encoder, "parameters_m": round(parameters / 1e6, 1), "dtype": str(dtype).replace("torch.", ""),
            "images": summary.num_images, "seconds": round(summary.seconds, 2),
            "images_per_s": round(summary.images_per_second, 1)}


def time_synthetic() -> dict:
    from diffusers_cir.data.synthetic import SyntheticCIRWorld

    start = time.perf_counter()
    world = SyntheticCIRWorld()
    built = time.perf_counter() - start
    start = time.perf_counter()
    world.triplets("train", num_triplets=100_000, seed=1)
    sampled = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        world.write_embeddings_dataset(folder, {"train": 100_000}, seed=2, progress=False)
        written = time.perf_counter() - start
    return {"items": world.num_items, "build_world_s": round(built, 2), "sample_100k_triplets_s": round(sampled, 2),
            "write_100k_triplets_s": round(written, 2)}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    table = []
    with tempfile.TemporaryDirectory() as folder:
        result["dataset"] = {"rows": args.rows, "embedding_rows": args.embedding_rows, "image_size": args.image_size,
                             **build_dataset(folder, max(args.rows, args.precompute_rows), args.image_size,
                                             embedding_rows=args.embedding_rows)}
        if not args.precompute_only:
            for config in ("images", "embeddings"):
                for workers in args.num_workers:
                    row = time_stream(folder, config, args.batch_size, workers, args.repeats)
                    result.setdefault("stream", []).append({"config": config, "num_workers": workers, **row})
                    table.append((f"stream {config}", f"workers={workers}", f"{row['rows_per_s']:.1f} rows/s"))
        workers = max(args.num_workers)
        row = time_precompute(folder, args.encoder, args.device, args.precompute_rows, args.batch_size, workers)
        result["precompute"] = {"num_workers": workers, **row}
        table.append(("precompute", f"{row['encoder']} {row['dtype']} workers={workers}", f"{row['images_per_s']:.1f} images/s"))
    if not args.skip_synthetic and not args.precompute_only:
        row = time_synthetic()
        result["synthetic"] = row
        table.append(("synthetic world", f"{row['items']} items", f"build {row['build_world_s']}s"))
        table.append(("synthetic triplets", "100k sampled", f"{row['sample_100k_triplets_s']}s"))
        table.append(("synthetic triplets", "100k written", f"{row['write_100k_triplets_s']}s"))

    width = max(len(r[0]) for r in table), max(len(r[1]) for r in table)
    print(f"{'what':<{width[0]}}  {'setting':<{width[1]}}  result")
    for what, setting, value in table:
        print(f"{what:<{width[0]}}  {setting:<{width[1]}}  {value}")
    os.makedirs(os.path.dirname(args.output_json), exist_ok=True)
    with open(args.output_json, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
