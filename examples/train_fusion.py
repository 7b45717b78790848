#!/usr/bin/env python
# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Train a composition network with accelerate: CLIP4Cir's Combiner, SCOT, MTST or FashionBLIP-2. See
examples/README.md.

    accelerate launch examples/train_fusion.py --method clip4cir \\
        --open-clip-model RN50x4 --open-clip-pretrained RN50x4.pt \\
        --train-data-dir ./fashioniq-triplets --dataset-config-name images \\
        --max-train-steps 20000 --checkpointing-steps 1000 --resume-from-checkpoint latest --output-dir clip4cir-fiq

    accelerate launch examples/train_fusion.py --method scot \\
        --pretrained-model-name-or-path openai/clip-vit-large-patch14 \\
        --train-data-dir ./scot-text-triplets --train-batch-size 1024 --output-dir scot-vit-l

    accelerate launch examples/train_fusion.py --method fashionblip2 --pretrained-model-name-or-path ./blip2-itm \\
        --train-data-dir ./fashion-triplets --dataset-config-name images --output-dir fashionblip2-fiq

The saved folder loads with ``AutoCIRPipeline.from_pretrained`` and evaluates with ``diffusers-cir evaluate``.
``--method NAME --help`` lists every option with that method's defaults and says which come from its paper and which
are our choice. Every flag also takes its snake_case spelling (``--max_train_steps``). The loop lives in
``diffusers_cir.training.train_fusion`` (``diffusers-cir demo`` trains with it too).
"""

import sys

from diffusers_cir.training.fusion_arguments import parse_args
from diffusers_cir.training.train_fusion import main

if __name__ == "__main__":
    main(parse_args())
    sys.exit(0)
