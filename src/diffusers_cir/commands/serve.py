"""``diffusers-cir serve``: a web page (gradio) for composed search.

    diffusers-cir serve                                            # the built-in picture world and its CompoDiff
    diffusers-cir serve --world tiny --port 7861
    diffusers-cir serve --index photos-index --model models/compodiff --model models/lincir

Needs gradio (``pip install 'diffusers-cir[serve]'``). The page listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from ..demo import WORLDS

    parser = subparsers.add_parser(
        "serve", help="A web page for composed search: the picture world, or any index and pipelines (gradio).",
        description=__doc__.split("\n\n", 1)[0].replace("``", ""),
    )
    parser.add_argument("--index", default=None, help="A saved index (`diffusers-cir index build`); default: the "
                        "built-in picture world.")
    parser.add_argument("--model", action="append", default=[],
                        help="A CIR pipeline (folder or Hub id) to search --index with; repeat to offer several. "
                        "Default: the model the index was built with.")
    parser.add_argument("--world", choices=WORLDS, default="default",
                        help="Without --index: the picture world to serve. Default: default.")
    parser.add_argument("--pipeline", default=None,
                        help="Without --index: a demo pipeline folder instead of the shipped one.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on. Default: 127.0.0.1.")
    parser.add_argument("--port", type=int, default=None, help="Port (default: gradio's, 7860 or the next free one).")
    parser.add_argument("--device", default=None, help="With --index: cpu / cuda (default: cuda when available).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.index is None and args.model:
        raise ValueError("--model searches an index: give the index with --index (without it the picture world is "
                         "served with its own model; --pipeline changes that model).")
    if args.index is not None and (args.pipeline is not None or args.world != "default"):
        raise ValueError("--pipeline and --world choose the built-in picture world; with --index give --model.")
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1-65535, got {args.port}.")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("`serve` needs gradio: pip install 'diffusers-cir[serve]'.") from None
    from ..demo.serve import index_backend, launch, picture_world_backend

    if args.index is not None:
        launch(index_backend(args.index, args.model, device=args.device), host=args.host, port=args.port)
        return 0
    import tempfile

    # The gallery pictures the page shows live as long as the page, and go with it.
    with tempfile.TemporaryDirectory(prefix="diffusers-cir-serve-") as work_dir:
        launch(picture_world_backend(args.world, args.pipeline, work_dir=work_dir), host=args.host, port=args.port)
    return 0
