#!/usr/bin/env python
"""Convert a released CompoDiff checkpoint to a diffusers pipeline folder.

    python scripts/convert_compodiff_to_diffusers.py --checkpoint_path CompoDiff-Aesthetic --output_path compodiff-aesthetic-diffusers \
        [--text_encoder_path CLIP-ViT-bigG-14 --image_encoder_path clip-vit-large-patch14] [--dtype float16]

Same as `diffusers-cir convert compodiff ...`.
"""

import argparse
import sys

from diffusers_cir.commands.convert import add_compodiff_arguments, run_compodiff


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_compodiff_arguments(parser)
    return run_compodiff(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
