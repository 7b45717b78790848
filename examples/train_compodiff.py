#!/usr/bin/env python
# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Train a CompoDiff prior with accelerate (stage 1, stage 2, or LoRA fine-tuning). See examples/README.md.

    accelerate launch examples/train_compodiff.py \\
        --pretrained-model-name-or-path ./compodiff-stage1 --train-data-dir ./synthtriplets \\
        --stage triplet --objective-ratios triplet=0.7,text_to_image=0.3 \\
        --train-batch-size 256 --max-train-steps 100000 --mixed-precision bf16 --use-ema \\
        --checkpointing-steps 2000 --resume-from-checkpoint latest --output-dir ./compodiff-stage2

Every flag also takes its snake_case spelling (``--max_train_steps``). The loop lives in
``diffusers_cir.training.train_compodiff`` so that ``diffusers-cir demo`` trains with exactly the same code; the
parts it shares with ``examples/train_lincir.py`` (arguments, output folder, checkpoints, trackers, components) are in
``diffusers_cir.training``. ``--help`` lists every option.
"""

import sys

from diffusers_cir.training import main, parse_args

if __name__ == "__main__":
    main(parse_args())
    sys.exit(0)
