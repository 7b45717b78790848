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

import sys

from diffusers_cir.cli import main as cli_main


def main(argv=None) -> int:
    """Same as ``diffusers-cir convert lincir ...``: one-line errors, exit status 2."""
    return cli_main(["convert", "lincir", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
