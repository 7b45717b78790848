#!/usr/bin/env python
"""Convert a released LinCIR / SEARLE phi (or Pic2Word img2text) checkpoint to diffusers-cir's format.

Only the projection (``config.json`` + ``diffusion_pytorch_model.safetensors``)::

    python scripts/convert_lincir_to_diffusers.py --checkpoint_path lincir_large.pt --output_dir lincir-phi-large

A whole :class:`~diffusers_cir.LinCIRPipeline` folder, with the CLIP model the checkpoint was trained for
(``openai/clip-vit-large-patch14`` for ``lincir_large.pt``; for ViT-bigG use ``Geonmo/CLIP-Giga-config-fixed``
with SDXL's ``tokenizer_2`` folder as ``--tokenizer_name_or_path``)::

    python scripts/convert_lincir_to_diffusers.py --checkpoint_path lincir_large.pt \\
        --clip_model_name_or_path openai/clip-vit-large-patch14 --output_dir lincir-vit-large

The result loads with ``TextualInversionProjection.from_pretrained`` / ``LinCIRPipeline.from_pretrained``.
"""

from __future__ import annotations

import argparse
import sys

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_path", required=True, help="The released .pt file (e.g. lincir_large.pt).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--clip_model_name_or_path", default=None, help="Build a full LinCIRPipeline with this CLIP model.")
    parser.add_argument("--tokenizer_name_or_path", default=None)
    parser.add_argument("--no_image_encoder", action="store_true", help="Leave the CLIP vision tower out of the pipeline.")
    parser.add_argument("--dropout", type=float, default=None, help="Dropout to record (default: the method's value).")
    parser.add_argument("--activation", default=None, help="Override the activation (gelu for phi, relu for Pic2Word).")
    parser.add_argument("--normalize_input", action="store_true", help="The checkpoint was trained with --l2_normalize.")
    parser.add_argument("--prompt_template", default="a photo of $ that {text}")
    parser.add_argument("--placeholder_token", default="$")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffusers_cir.conversion.lincir import build_lincir_pipeline, convert_lincir_phi_checkpoint

    dtype = _DTYPES[args.dtype]
    phi = convert_lincir_phi_checkpoint(
        args.checkpoint_path,
        dropout=args.dropout,
        activation=args.activation,
        normalize_input=args.normalize_input,
        torch_dtype=dtype,
    )
    config = phi.config
    print(
        f"phi: {config.input_dim} -> {config.hidden_dim} x{config.num_hidden_layers} -> {config.output_dim} "
        f"({config.activation}, dropout {config.dropout})"
    )
    if args.clip_model_name_or_path is None:
        phi.save_pretrained(args.output_dir, safe_serialization=True)
        print(f"Saved the projection to {args.output_dir}")
        return 0
    pipeline = build_lincir_pipeline(
        phi,
        args.clip_model_name_or_path,
        tokenizer_name_or_path=args.tokenizer_name_or_path,
        with_image_encoder=not args.no_image_encoder,
        torch_dtype=dtype,
        prompt_template=args.prompt_template,
        placeholder_token=args.placeholder_token,
    )
    pipeline.save_pretrained(args.output_dir, safe_serialization=True)
    print(f"Saved the LinCIR pipeline to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
