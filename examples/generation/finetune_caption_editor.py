#!/usr/bin/env python
# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Fine-tune a causal LM (LoRA by default) to write caption triplets, for ``diffusers-cir generate --strategy llm``.

CompoDiff's SynthTriplets18M fine-tuned OPT-6.7B on InstructPix2Pix's 452k (caption, instruction, edited caption)
triplets; any transformers causal LM and any such data work here (JSONL / CSV / Parquet, a dataset folder or a Hub
id; InstructPix2Pix's column names `input`, `edit`, `output` by default):

    accelerate launch examples/generation/finetune_caption_editor.py \\
        --model_name_or_path facebook/opt-6.7b --train_data ./ip2p_caption_triplets.jsonl \\
        --output_dir ./opt-caption-editor --train_batch_size 8 --gradient_accumulation_steps 4 \\
        --learning_rate 2e-4 --max_train_steps 20000 --mixed_precision bf16 --checkpointing_steps 2000

    diffusers-cir generate --strategy llm --captions captions.txt --caption-editor facebook/opt-6.7b \\
        --caption-editor-adapter ./opt-caption-editor --output my_triplets

The loss is on the completion only (`instruction %% edited caption END` + EOS). The LoRA adapter (or, with
`--full_finetune`, the whole model) and the tokenizer are saved to `--output_dir`; `--resume_from_checkpoint latest`
(or a `checkpoint-<step>` name) continues an interrupted run from that checkpoint (weights, optimizer, scheduler, step,
random states) once its checksums match.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="A transformers causal LM (folder or Hub id).")
    parser.add_argument("--train_data", required=True, help="Caption triplets: a file, a dataset folder or a Hub id.")
    parser.add_argument("--caption_column", default="input")
    parser.add_argument("--instruction_column", default="edit")
    parser.add_argument("--edited_caption_column", default="output")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--full_finetune", action="store_true", help="Train every weight instead of LoRA adapters.")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--lora_alpha", type=float, default=32.0)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--lora_target_modules", nargs="+", default=None,
                        help="Module names to adapt (default: peft's choice for the architecture).")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--train_batch_size", type=int, default=8, help="Per device.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--lr_scheduler", default="cosine",
                        choices=["linear", "cosine", "constant", "constant_with_warmup"])
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--max_length", type=int, default=256, help="Tokens per example.")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--checkpointing_steps", type=int, default=None)
    # Both spellings: a refused checkpoint's message names the flag in kebab-case.
    parser.add_argument("--resume-from-checkpoint", "--resume_from_checkpoint", dest="resume_from_checkpoint",
                        default=None, help="`latest`, or a checkpoint-<step> folder of --output_dir.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> str:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffusers_cir.generation.finetune import FinetuneConfig, finetune_caption_editor, read_caption_triplets

    config = FinetuneConfig(
        learning_rate=args.learning_rate, max_train_steps=args.max_train_steps,
        train_batch_size=args.train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, max_length=args.max_length, use_lora=not args.full_finetune,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_target_modules=tuple(args.lora_target_modules) if args.lora_target_modules else None, seed=args.seed,
    ).check()  # before anything loads
    triplets = read_caption_triplets(args.train_data, args.caption_column, args.instruction_column,
                                     args.edited_caption_column, args.max_train_samples)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    if accelerator.is_main_process:
        print(f"{len(triplets):,} caption triplets; {'full fine-tuning' if args.full_finetune else 'LoRA'} of "
              f"{args.model_name_or_path} for {args.max_train_steps} steps")
    model = finetune_caption_editor(model, tokenizer, triplets, config, accelerator=accelerator,
                                    output_dir=args.output_dir, checkpointing_steps=args.checkpointing_steps,
                                    resume=args.resume_from_checkpoint or False)
    if accelerator.is_main_process:
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        print(f"Saved the {'model' if args.full_finetune else 'LoRA adapter'} and tokenizer to {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    main(parse_args())
    sys.exit(0)
