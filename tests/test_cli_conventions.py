"""One command-line convention: kebab-case flags (snake_case kept only as aliases), fast start-up."""

import argparse
import subprocess
import sys

from diffusers_cir.cli import build_parser


def _parsers(parser, prog=None):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from _parsers(subparser)


def test_every_flag_is_kebab_case_first():
    offenders = []
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            longs = [option for option in action.option_strings if option.startswith("--")]
            if longs and "_" in longs[0]:
                offenders.append(f"{parser.prog} {longs[0]}")
    assert not offenders, f"flags whose canonical spelling is not kebab-case: {offenders}"


def test_the_same_thing_has_the_same_flag_in_every_command():
    names = {}
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            names.setdefault(action.dest, set()).update(
                option for option in action.option_strings if option.startswith("--"))
    # sampler steps, negative texts and output folders are spelled one way wherever they exist
    for dest, canonical in (("negative_text", "--negative-prompt"), ("steps", "--num-inference-steps")):
        assert canonical in names.get(dest, {canonical}), (dest, names.get(dest))
    search, evaluate = (parser for parser in _parsers(build_parser()) if parser.prog.endswith((" search", " evaluate")))
    for parser in (search, evaluate):
        flags = {option for action in parser._actions for option in action.option_strings}
        assert "--negative-prompt" in flags and "--num-inference-steps" in flags, parser.prog


def test_help_and_import_do_not_load_torch():
    code = (
        "import sys; import diffusers_cir; assert 'torch' not in sys.modules, 'import diffusers_cir'; "
        "from diffusers_cir.cli import build_parser; build_parser(); "
        "assert 'torch' not in sys.modules, 'diffusers-cir --help'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
