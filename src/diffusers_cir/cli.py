"""The ``diffusers-cir`` command.

Each sub-command lives in ``diffusers_cir.commands.<name>`` and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (called with the parsed namespace, returning an exit code). Keeping
them in separate modules keeps ``diffusers-cir --help`` fast and the commands independent.

A user error (bad input, a missing file, an output that is already there, a damaged or mismatched index) is one
line on stderr, ``diffusers-cir <command>: error: <message>``, and exit status 2, the way argparse reports a bad
flag; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# What a command raises for a user error (OSError covers FileNotFoundError, FileExistsError, PermissionError, ...).
USER_ERRORS = (ValueError, OSError)

COMMANDS = ("demo", "serve", "search", "index", "evaluate", "data", "convert", "push", "generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-cir",
        description=("Composed Image Retrieval: CompoDiff, LinCIR, BGE-VL, MagicLens, composition networks, MLLM and "
                     "training-free systems behind one pipeline interface."),
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
    _record_prog(parser)
    return parser


def _record_prog(parser: argparse.ArgumentParser) -> None:
    """Store each (sub-)command's ``prog`` ("diffusers-cir convert compodiff") as a default, for error messages."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                subparser.set_defaults(_prog=subparser.prog)
                _record_prog(subparser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        print(f"{getattr(args, '_prog', parser.prog)}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
