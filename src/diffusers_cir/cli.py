"""The ``diffusers-cir`` command.

Each sub-command lives in ``diffusers_cir.commands.<name>`` and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (called with the parsed namespace, returning an exit code). Keeping
them in separate modules keeps ``diffusers-cir --help`` fast and the commands independent.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "search", "index", "evaluate", "data", "convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-cir",
        description="Composed Image Retrieval with CompoDiff and LinCIR.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"diffusers_cir.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"diffusers_cir.commands.{name}":
                continue  # command not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
