"""`diffusers-cir convert compodiff ...`: released checkpoints to diffusers folders."""

from __future__ import annotations

import argparse

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def add_compodiff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint_path", required=True, help="Released checkpoint folder (config.json + pytorch_model.bin) or weights file.")
    parser.add_argument("--output_path", required=True, help="Folder to write the diffusers pipeline to.")
    parser.add_argument("--text_encoder_path", default=None, help="transformers CLIP text model folder (hidden width 1280 for the releases).")
    parser.add_argument("--image_encoder_path", default=None, help="transformers CLIPVisionModelWithProjection folder (ViT-L/14 for the releases).")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Precision of the saved weights.")


def run_compodiff(args: argparse.Namespace) -> int:
    import torch

    from ..conversion import convert_compodiff_checkpoint_to_pipeline

    pipe = convert_compodiff_checkpoint_to_pipeline(
        args.checkpoint_path,
        args.output_path,
        text_encoder_path=args.text_encoder_path,
        image_encoder_path=args.image_encoder_path,
        torch_dtype=getattr(torch, DTYPES[args.dtype]),
    )
    count = sum(parameter.numel() for parameter in pipe.transformer.parameters())
    print(f"Wrote {args.output_path}: CompoDiffTransformer with {count:,} parameters ({dict(pipe.transformer.config)['num_layers']} layers).")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="Convert released checkpoints to diffusers folders.")
    kinds = parser.add_subparsers(dest="kind", metavar="MODEL", required=True)
    compodiff = kinds.add_parser("compodiff", help="A released CompoDiff checkpoint (navervision/CompoDiff-*).")
    add_compodiff_arguments(compodiff)
    compodiff.set_defaults(func=run_compodiff)
