#!/usr/bin/env python
"""Compute ClipSeg masks once into a dataset's ``images`` configuration (multi-GPU, resumable), for CompoDiff's masked
(inpainting) objective: ``--recipe paper_stage2`` trains it with these masks (``--masked-objective-masks data``).

    python examples/precompute_masks.py --dataset my_dataset --model CIDAS/clipseg-rd64-refined
    accelerate launch examples/precompute_masks.py --dataset my_dataset --model CIDAS/clipseg-rd64-refined
    # then the embeddings, which carry each mask and the embedding of the masked target image:
    python examples/precompute_embeddings.py --dataset my_dataset --model openai/clip-vit-large-patch14

Each row's term (a stored mask term, the target keyword, the words the target caption adds, or an object term of the
caption from the part-of-speech tagger) is segmented in the target image; see ``diffusers_cir.generation.dataset_masks``.
Shards that have masks are kept (``--overwrite`` recomputes them), so an interrupted run resumes. ``diffusers-cir
generate`` writes masks itself: its datasets need no pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger("precompute_masks")


def parse_args(argv=None) -> argparse.Namespace:
    from diffusers_cir.checks import argparse_type, check_float, check_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="Dataset folder with images/{split}-*.parquet.")
    parser.add_argument("--model", required=True, help="CLIPSegForImageSegmentation folder or Hub id (with its processor).")
    parser.add_argument("--split", action="append", default=None, help="Only these splits (repeatable; default: all).")
    parser.add_argument("--tagger", choices=("auto", "spacy", "builtin"), default="auto",
                        help="Part-of-speech tagger for caption-only rows (auto: spaCy when installed, else the "
                        "built-in rule).")
    parser.add_argument("--threshold", type=argparse_type(check_float, float, minimum=0.0, maximum=1.0), default=0.5,
                        help="ClipSeg probability above which a pixel is in the mask. Default: 0.5.")
    parser.add_argument("--size", type=argparse_type(check_int, minimum=1), default=64,
                        help="Side of the stored masks (CompoDiff: 64). Default: 64.")
    parser.add_argument("--batch-size", type=argparse_type(check_int, minimum=1), default=16,
                        help="Images per ClipSeg call. Default: 16.")
    parser.add_argument("--overwrite", action="store_true", help="Recompute shards that have masks.")
    parser.add_argument("--no-progress", action="store_true", help="Disable the progress bar.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from diffusers_cir.generation.dataset_masks import (
        precompute_masks,
        record_masks_card,
    )
    from diffusers_cir.generation.keyword_triplets import load_tagger

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    accelerator = Accelerator()
    model = CLIPSegForImageSegmentation.from_pretrained(args.model).to(accelerator.device).eval()
    processor = CLIPSegProcessor.from_pretrained(args.model)
    summary = precompute_masks(
        args.dataset, model, processor, tagger=load_tagger(args.tagger), splits=args.split, size=args.size,
        threshold=args.threshold, batch_size=args.batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, overwrite=args.overwrite,
        progress=not args.no_progress and accelerator.is_local_main_process,
    )
    logger.info("rank %d: %s", accelerator.process_index, summary.format())
    per_rank = gather_object([summary])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info("recorded the mask columns in %s", record_masks_card(args.dataset))
        print(json.dumps({"processes": len(per_rank), "rows": sum(s.num_rows for s in per_rank),
                          "masks": sum(s.num_masks for s in per_rank),
                          "shards_done": sum(len(s.shards_done) for s in per_rank),
                          "shards_with_masks_already": sum(len(s.shards_skipped) for s in per_rank)}))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
