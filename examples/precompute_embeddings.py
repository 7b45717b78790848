#!/usr/bin/env python
"""Precompute CLIP image embeddings of a triplet dataset's ``images`` configuration (multi-GPU, resumable).

Writes the ``embeddings`` configuration next to ``images`` (same shards, same row order) and records it in
the dataset card, so training can stream embeddings instead of decoding and encoding images every epoch.

    # one GPU, or CPU
    python examples/precompute_embeddings.py --dataset my_dataset --model openai/clip-vit-large-patch14
    # every GPU of the machine: each process takes every world_size-th shard
    accelerate launch examples/precompute_embeddings.py --dataset my_dataset --model openai/clip-vit-large-patch14
    # open_clip backend
    python examples/precompute_embeddings.py --dataset my_dataset --backend open_clip --model ViT-L-14 --pretrained openai
    # CLIP4Cir's features: target pad (ratio 1.25) before CLIP's preprocessing
    python examples/precompute_embeddings.py --dataset my_dataset --backend open_clip --model RN50x4 \
        --pretrained RN50x4.pt --image-preprocessing targetpad

The card records the encoder and the image preprocessing (``embeddings_image_preprocessing``,
``embeddings_target_ratio``); ``examples/train_fusion.py`` on the ``embeddings`` configuration saves a pipeline that
preprocesses queries and gallery that way.

Interrupted? Run the same command again: finished shards are kept, the interrupted one is redone. The log
reports throughput (images/s) per shard and overall; rows whose images do not decode are skipped and listed.
The main process prints one JSON line summing every process's work (``rows``, ``images``, ``shards_encoded``,
``shards_already_done``, ``skipped_rows``, ``images_per_second``), with each process's own counts in ``per_rank``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from diffusers_cir.checks import argparse_type, check_float

# diffusers_cir.retrieval.image_processing_targetpad's IMAGE_PREPROCESSINGS (not imported: it imports transformers).
IMAGE_PREPROCESSINGS = ("clip", "targetpad")

logger = logging.getLogger("precompute_embeddings")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="Dataset folder with images/{split}-*.parquet.")
    parser.add_argument("--output", default=None, help="Where embeddings/ goes (default: the dataset folder).")
    parser.add_argument("--split", default="train", help="Split to encode. Default: train.")
    parser.add_argument("--backend", choices=("transformers", "open_clip"), default="transformers")
    parser.add_argument("--model", required=True, help="transformers: model folder or Hub id; open_clip: model name.")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag (e.g. openai, laion2b_s32b_b82k).")
    parser.add_argument("--batch-size", type=int, default=64, help="Rows per encoder call (2x images). Default: 64.")
    parser.add_argument("--num-workers", type=int, default=4, help="Decoding workers per process. Default: 4.")
    parser.add_argument("--image-preprocessing", default=None, choices=IMAGE_PREPROCESSINGS,
                        help="How images become pixels. clip: CLIP's shortest-side resize and centre crop (open_clip: its "
                        "evaluation transform); targetpad: CLIP4Cir's target pad first (an image whose long/short side "
                        "ratio is at least --target-ratio is zero-padded on its short side towards it; "
                        "diffusers_cir.TargetPadImageProcessor), the features CLIP4Cir's authors train the Combiner on. "
                        "Recorded in the dataset card. Default: clip (targetpad when --target-ratio is given).")
    parser.add_argument("--target-ratio", type=argparse_type(check_float, float, minimum=1.0), default=None,
                        help="Target pad's ratio (implies --image-preprocessing targetpad; default 1.25, the CLIP4Cir "
                        "and CIReVL authors' value; 1 pads to a square).")
    parser.add_argument("--fp16", action="store_true", help="Encode in float16 (GPU).")
    parser.add_argument("--no-normalize", action="store_true", help="Store raw embeddings instead of L2-normalised.")
    parser.add_argument("--no-progress", action="store_true", help="Disable the progress bar.")
    args = parser.parse_args(argv)
    # Checked here, not by the DataLoader after the CLIP model has loaded (its message names no flag).
    if args.batch_size < 1:
        parser.error(f"--batch-size must be a positive integer, got {args.batch_size}.")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be 0 or a positive integer, got {args.num_workers}.")
    if args.target_ratio is not None and args.image_preprocessing == "clip":
        parser.error(f"--target-ratio {args.target_ratio} is target pad's ratio: it goes with --image-preprocessing "
                     "targetpad, not clip.")
    if args.image_preprocessing is None:
        args.image_preprocessing = "targetpad" if args.target_ratio is not None else "clip"
    return args


def _counts(summary) -> dict:
    return {
        "rows": summary.num_rows,
        "images": summary.num_images,
        "shards_encoded": len(summary.shards_done),
        "shards_already_done": len(summary.shards_skipped),
        "skipped_rows": len(summary.skipped_rows),
        "images_per_second": round(summary.images_per_second, 1),
    }


def _check_recorded_preprocessing(args) -> None:
    """Refuse to add embeddings made another way to a folder whose card records its preprocessing: shards already
    written would be kept (resume), and one configuration must hold features of one preprocessing."""
    import os

    from diffusers_cir.data import schema
    from diffusers_cir.data.precompute import describe_preprocessing, recorded_embeddings_preprocessing
    from diffusers_cir.retrieval.image_processing_targetpad import CLIP4CIR_TARGET_RATIO

    folder = args.output or args.dataset
    recorded = recorded_embeddings_preprocessing(folder)
    wanted = (args.image_preprocessing, None if args.image_preprocessing == "clip" else
              float(args.target_ratio or CLIP4CIR_TARGET_RATIO))
    if recorded is None or recorded == wanted or not os.path.isdir(os.path.join(folder, schema.EMBEDDINGS_CONFIG)):
        return
    print(
        f"precompute_embeddings.py: error: --image-preprocessing {describe_preprocessing(*wanted)}, but the embeddings "
        f"in {folder!r} were made with {describe_preprocessing(*recorded)} (its dataset card's "
        f"embeddings_image_preprocessing): pass that, or delete {os.path.join(folder, schema.EMBEDDINGS_CONFIG)} to "
        "encode every split again.", file=sys.stderr,
    )
    raise SystemExit(2)


def main(argv=None) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from diffusers_cir.data import schema
    from diffusers_cir.data.precompute import (
        PrecomputeSummary,
        open_clip_embedder,
        precompute_embeddings,
        record_embeddings_card,
        transformers_embedder,
    )
    from diffusers_cir.data.shards import shard_files

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not shard_files(args.dataset, schema.IMAGES_CONFIG, args.split):  # before the model loads
        raise FileNotFoundError(
            f"--dataset {args.dataset!r} --split {args.split!r}: no {args.dataset}/{schema.IMAGES_CONFIG}/{args.split}-*.parquet "
            "shards; write some with `diffusers-cir data write`."
        )
    _check_recorded_preprocessing(args)
    accelerator = Accelerator()
    if args.backend == "transformers":
        dtype = torch.float16 if args.fp16 else torch.float32
        embedder = transformers_embedder(args.model, device=accelerator.device, dtype=dtype,
                                         image_preprocessing=args.image_preprocessing, target_ratio=args.target_ratio)
    else:
        embedder = open_clip_embedder(
            args.model, args.pretrained, device=accelerator.device, precision="fp16" if args.fp16 else "fp32",
            image_preprocessing=args.image_preprocessing, target_ratio=args.target_ratio,
        )
    if accelerator.is_main_process:
        logger.info("image preprocessing: %s", args.image_preprocessing if embedder.image_preprocessing != "targetpad"
                    else f"targetpad (target ratio {embedder.target_ratio})")
    summary = precompute_embeddings(
        args.dataset,
        embedder,
        output_folder=args.output,
        split=args.split,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        normalize=not args.no_normalize,
        progress=not args.no_progress and accelerator.is_local_main_process,
    )
    logger.info("rank %d: %s", accelerator.process_index, summary.format())
    for row_id, reason in summary.skipped_rows:
        logger.warning("rank %d skipped %s: %s", accelerator.process_index, row_id, reason)
    # Each process only knows its own shards: the summary of the run is gathered from all of them (this also
    # waits for every rank to finish before the card counts the rows).
    per_rank = gather_object([summary])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        card = record_embeddings_card(
            args.output or args.dataset, embedder.name, embedder.embedding_dim, split=args.split,
            normalize=not args.no_normalize, image_preprocessing=embedder.image_preprocessing,
            target_ratio=embedder.target_ratio,
        )
        logger.info("recorded the embeddings configuration in %s", card)
        total = PrecomputeSummary.combine(per_rank)
        logger.info("all %d process(es): %s", len(per_rank), total.format())
        print(json.dumps({"processes": len(per_rank), **_counts(total),
                          "per_rank": [{"rank": rank, **_counts(s)} for rank, s in enumerate(per_rank)]}))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
