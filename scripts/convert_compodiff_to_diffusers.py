#!/usr/bin/env python
"""Convert a released CompoDiff checkpoint to a diffusers pipeline folder.

    python scripts/convert_compodiff_to_diffusers.py --checkpoint_path CompoDiff-Aesthetic --output_path compodiff-aesthetic-diffusers \
        [--text_encoder_path CLIP-ViT-bigG-14 --image_encoder_path clip-vit-large-patch14] [--dtype float16]

Same as `diffusers-cir convert compodiff ...`.
"""

from __future__ import annotations

import sys

from diffusers_cir.cli import main as cli_main


def main(argv=None) -> int:
    """Same as ``diffusers-cir convert compodiff ...``: one-line errors, exit status 2."""
    return cli_main(["convert", "compodiff", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
