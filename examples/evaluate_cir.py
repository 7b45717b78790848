#!/usr/bin/env python
"""Evaluate a CIR pipeline (CompoDiff, LinCIR, ...: anything AutoCIRPipeline loads) on CIRR, FashionIQ, CIRCO or
GeneCIS.

The numbers match the official evaluation code (see ``diffusers_cir.metrics``); hidden-label test splits get
the official submission files (CIRR: top-50 and top-3 subset JSONs; CIRCO: top-50 per query id).

    python examples/evaluate_cir.py cirr --pipeline compodiff-aesthetic-diffusers \\
        --data-root /data/CIRR --split val --output-dir eval/cirr-val
    python examples/evaluate_cir.py fashioniq --pipeline lincir-diffusers --fashioniq-captions searle \\
        --data-root /data/fashionIQ_dataset --output-dir eval/fashioniq-val
    python examples/evaluate_cir.py circo --pipeline compodiff-aesthetic-diffusers --split test \\
        --data-root /data/CIRCO --output-dir eval/circo-test

Expected layouts (the loaders name the missing file when one is not found):
    CIRR       <root>/cirr/captions/cap.rc2.<split>.json, <root>/cirr/image_splits/split.rc2.<split>.json, <root>/dev/...
    FashionIQ  <root>/captions/cap.<category>.<split>.json, <root>/image_splits/split.<category>.<split>.json, <root>/images/
    CIRCO      <root>/annotations/<split>.json, <root>/COCO2017_unlabeled/{annotations,unlabeled2017}/
    GeneCIS    <root>/<task>.json with --image-root (COCO val2017 or Visual Genome images)

Outputs in --output-dir: metrics.json, metrics.md, rankings*.json, query_embeddings*.safetensors, submission
files, and embedding_cache/ (gallery embeddings, reused by later runs and resumed after an interruption).
"""

import argparse
import sys

from diffusers_cir.evaluation.command_line import add_evaluation_arguments, run_from_args


def main(argv=None, pipeline=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_arguments(parser)
    return run_from_args(parser.parse_args(argv), pipeline=pipeline)


if __name__ == "__main__":
    sys.exit(main())
