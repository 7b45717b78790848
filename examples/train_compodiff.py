#!/usr/bin/env python
# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Train a CompoDiff prior with accelerate (stage 1, stage 2, or LoRA fine-tuning). See examples/README.md.

    accelerate launch examples/train_compodiff.py \\
        --pretrained_model_name_or_path ./compodiff-stage1 --train_data_dir ./synthtriplets \\
        --stage triplet --objective_ratios triplet=0.7,text_to_image=0.3 \\
        --train_batch_size 256 --max_train_steps 100000 --mixed_precision bf16 --use_ema \\
        --checkpointing_steps 2000 --resume_from_checkpoint latest --output_dir ./compodiff-stage2

The loop itself lives in ``diffusers_cir.training.train_compodiff`` so that ``diffusers-cir demo`` trains with
exactly the same code; ``--help`` lists every option.
"""

import sys

from diffusers_cir.training import main, parse_args

if __name__ == "__main__":
    main(parse_args())
    sys.exit(0)
