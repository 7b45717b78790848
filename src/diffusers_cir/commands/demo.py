"""``diffusers-cir demo``: composed image retrieval end to end on pixels, offline, on CPU, on the picture world.

    diffusers-cir demo                                  # the shipped CompoDiff vs the baselines, writes the page
    diffusers-cir demo --world tiny --num-queries 100   # a few seconds
    diffusers-cir demo --methods compodiff,image_only --html results/demo.html
    diffusers-cir demo --train --update-shipped-pipeline   # train the CLIP pair and CompoDiff again, ship them
    diffusers-cir demo --methods fashionblip2,image_text_sum   # fine-tune FashionBLIP-2 on the shipped small BLIP-2
    diffusers-cir demo --methods fashionblip2 --train-blip2 --update-shipped-pipeline   # pretrain that BLIP-2, ship it
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from . import non_negative_int, positive_int

DEFAULT_PAGE = "diffusers-cir-demo.html"


def _method_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated method names, got {text!r}")
    return list(dict.fromkeys(names))


def register(subparsers) -> None:
    from ..demo import DEFAULT_METHODS, WORLDS

    parser = subparsers.add_parser(
        "demo",
        help="Offline end-to-end demo on pixels: the picture world, CompoDiff vs baselines, an HTML page.",
        description=(
            "Draws the built-in picture world's gallery, loads the small CompoDiff the package ships for it (its CLIP "
            "pair trained contrastively on the world, CompoDiff on its triplets; --train trains them again), indexes "
            "the gallery, composes the held-out test queries from reference pictures and modification texts with "
            "each method, prints Recall@K and writes an HTML page of example queries with their top results. CPU, "
            "no network."
        ),
    )
    parser.add_argument("--world", choices=WORLDS, default="default",
                        help="default: 1,728 pictures; tiny: 72 (seconds). Default: default.")
    parser.add_argument("--methods", type=_method_list, default=list(DEFAULT_METHODS),
                        help=f"Comma-separated methods to compare. Default: {','.join(DEFAULT_METHODS)}.")
    parser.add_argument("--num-queries", type=positive_int, default=None,
                        help="Test queries to run, drawn at random (default: 1,000; --quick: 200).")
    parser.add_argument("--all-queries", action="store_true", help="Run every test query (2,880 in the default world).")
    parser.add_argument("--quick", action="store_true", help="200 queries, for a fast check.")
    parser.add_argument("--examples", type=non_negative_int, default=6,
                        help="Example queries to print and show on the page. Default: 6.")
    parser.add_argument("--html", default=None,
                        help=f"The HTML page to write. Default: {DEFAULT_PAGE} in the current folder.")
    parser.add_argument("--no-html", action="store_true", help="Write no page.")
    parser.add_argument("--json", type=str, default=None, help="Also write the measurements to this JSON file.")
    parser.add_argument("--pipeline", type=str, default=None,
                        help="A demo pipeline folder to run instead of the shipped one (not with --train).")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="World and query seed. Default: 0.")
    training = parser.add_argument_group("training (--train)")
    training.add_argument("--train", action="store_true",
                          help="Train the CLIP pair and CompoDiff now with the real training code (tens of minutes "
                          "on 2 CPU cores for the default world) instead of loading the shipped pipeline.")
    training.add_argument("--steps", type=positive_int, default=None, help="CompoDiff training steps (default 3000).")
    training.add_argument("--clip-steps", type=positive_int, default=None, help="CLIP training steps (default 1500).")
    training.add_argument("--train-triplets", type=positive_int, default=None,
                          help="Training triplets to write (default 30,000).")
    training.add_argument("--output-dir", type=str, default=None, help="Keep the data and models here.")
    training.add_argument("--train-blip2", action="store_true",
                          help="fashionblip2: pretrain the small BLIP-2 it fine-tunes now (BLIP-2's first stage on the "
                          "world's pictures and captions; about 13 minutes on one CPU thread) instead of loading "
                          "the shipped one.")
    training.add_argument("--blip2-steps", type=positive_int, default=None,
                          help="BLIP-2 pretraining steps (default 3000; needs --train-blip2).")
    training.add_argument("--update-shipped-pipeline", action="store_true",
                          help="Ship what this command trains: with --train the pipeline (float16, with its model "
                          "card), with --train-blip2 the BLIP-2 (with what fashionblip2 measured on it).")
    parser.set_defaults(func=run)


def _check_arguments(args: argparse.Namespace) -> None:
    from ..demo.methods import DEMO_METHODS

    if args.update_shipped_pipeline and not (args.train or args.train_blip2):
        raise ValueError("--update-shipped-pipeline needs --train or --train-blip2 (it ships what this command "
                         "trains).")
    if args.train_blip2 and "fashionblip2" not in args.methods:
        raise ValueError("--train-blip2 pretrains the BLIP-2 that fashionblip2 fine-tunes: add fashionblip2 to "
                         "--methods.")
    if args.blip2_steps is not None and not args.train_blip2:
        raise ValueError("--blip2-steps needs --train-blip2 (without it fashionblip2 fine-tunes the shipped BLIP-2).")
    if not args.train:  # training options without --train were silently ignored
        given = [flag for flag, value in (("--steps", args.steps), ("--clip-steps", args.clip_steps),
                                          ("--train-triplets", args.train_triplets),
                                          ("--output-dir", None if args.train_blip2 else args.output_dir))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --train (without it the "
                             "demo loads a trained pipeline and trains nothing).")
    elif args.pipeline is not None:
        raise ValueError("--pipeline loads a trained demo pipeline, --train trains a new one: give one of them.")
    if sum([args.num_queries is not None, args.all_queries, args.quick]) > 1:
        raise ValueError("--num-queries, --all-queries and --quick each set the number of queries: give one of them.")
    if args.no_html and args.html is not None:
        raise ValueError("--html and --no-html contradict each other.")
    unknown = [name for name in args.methods if name not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown method(s) {', '.join(map(repr, unknown))}; registered: "
                         f"{', '.join(DEMO_METHODS)}.")


def run(args: argparse.Namespace) -> int:
    from ..demo import SHIPPED_PIPELINE, format_result, run_demo

    _check_arguments(args)
    num_queries = None if args.all_queries else (args.num_queries or (200 if args.quick else 1000))
    recipe = None
    if args.train:
        from ..demo.training import PictureDemoRecipe

        recipe = PictureDemoRecipe(world=args.world, seed=args.seed)
        recipe.steps = args.steps or recipe.steps
        recipe.clip.steps = args.clip_steps or recipe.clip.steps
        recipe.clip.seed = args.seed
        recipe.num_train_triplets = args.train_triplets or recipe.num_train_triplets
    temporary = None
    work_dir = args.output_dir
    blip2_recipe = None
    if args.train_blip2:
        from ..demo.blip2 import Blip2Recipe

        blip2_recipe = Blip2Recipe(seed=args.seed, steps=args.blip2_steps or Blip2Recipe().steps)
    if args.update_shipped_pipeline and work_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="diffusers-cir-demo-train-")
        work_dir = temporary.name
    try:
        result = run_demo(
            world_name=args.world, methods=args.methods, num_queries=num_queries, num_examples=args.examples,
            pipeline_dir=args.pipeline or SHIPPED_PIPELINE, train=args.train, recipe=recipe, work_dir=work_dir,
            seed=args.seed, html=None if args.no_html else (args.html or DEFAULT_PAGE), blip2_recipe=blip2_recipe,
        )
        print()
        print(format_result(result))
        if args.update_shipped_pipeline and args.train_blip2:
            from ..demo.blip2 import export_blip2

            measured = {"recalls": result.recalls, "num_queries": result.num_queries,
                        "command": _measuring_command(args, num_queries, blip2=True)}
            target = export_blip2(Path(work_dir) / "methods" / "blip2", measured=measured)
            print(f"\nShipped BLIP-2 updated: {target}")
        if args.update_shipped_pipeline and args.train:
            from ..demo.training import export_pipeline

            def measure(folder):  # the float16 weights as shipped, measured as the command below measures them
                shipped = run_demo(world_name=args.world, methods=args.methods, num_queries=num_queries,
                                   pipeline_dir=folder, seed=args.seed, show_progress=False, log=lambda *_: None)
                return shipped, _measuring_command(args, num_queries)

            target = export_pipeline(Path(work_dir) / "training" / "compodiff", SHIPPED_PIPELINE, recipe,
                                     _clip_summary(Path(work_dir)), measure)
            print(f"\nShipped pipeline updated: {target}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    finally:
        if temporary is not None:
            temporary.cleanup()
    return 0


def _measuring_command(args: argparse.Namespace, num_queries: int | None, blip2: bool = False) -> str:
    """The `diffusers-cir demo` command line that measures the shipped pipeline (``blip2``: the shipped BLIP-2,
    fine-tuned by the run's methods) as the training run did."""
    import shlex

    argv = ["diffusers-cir", "demo"] + (["--methods", ",".join(args.methods)] if blip2 else [])
    if args.world != "default":
        argv += ["--world", args.world]
    if args.seed:
        argv += ["--seed", str(args.seed)]
    argv += ["--all-queries"] if num_queries is None else ([] if num_queries == 1000 else ["--num-queries", str(num_queries)])
    return shlex.join(argv)


def _clip_summary(work_dir: Path) -> dict:
    path = work_dir / "training" / "clip_summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
