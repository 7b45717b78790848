"""``diffusers-cir generate``: composed image retrieval triplets, the SynthTriplets18M recipe and more.

    diffusers-cir generate --demo --output demo_triplets
    diffusers-cir generate --strategy keyword llm --captions captions.txt --caption-editor ./opt-editor \\
        --output my_triplets --sd-model stable-diffusion-v1-5/stable-diffusion-v1-5 --dtype float16
    accelerate launch -m diffusers_cir.cli generate --strategy keyword --captions laion_captions.parquet ...
    diffusers-cir generate --strategy mtst facap --image-pairs my_pairs/ --vlm ./llava --instruction-llm ./qwen ...

Run the same command again to resume a killed run (completed shards are skipped). See diffusers_cir.generation.
"""

from __future__ import annotations

import argparse
import json

from . import non_negative_int, positive_int

STRATEGIES = ("keyword", "llm", "mtst", "facap")


OFF = "off"  # a filter threshold turned off (None in the recipe)


def _similarity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1], got {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1], got {text!r}")
    return value


def _threshold(text: str):
    """A CLIP threshold in [-1, 1], or 'off'."""
    if text.lower() == OFF:
        return OFF
    try:
        return _similarity(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1] or 'off', got {text!r}") from None


def _unit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _add_run_arguments(parser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--output", required=True, help="Dataset folder to write (or resume).")
    run.add_argument("--demo", action="store_true",
                     help="Run every stage offline on tiny random models built in code, on demo inputs.")
    run.add_argument("--strategy", nargs="+", choices=STRATEGIES, default=None,
                     help="keyword / llm: caption triplets drawn by Stable Diffusion; mtst / facap: texts of given "
                     "image pairs. Default: keyword.")
    run.add_argument("--captions",
                     help="Captions: a .txt (one a line), .jsonl, .csv, .parquet, a folder or a dataset id.")
    run.add_argument("--caption-column", help="Caption column (default: caption, else text).")
    run.add_argument("--image-pairs", help="Image pairs: a folder (pairs.jsonl / sub-folders with reference.* and "
                     "target.*), a file, or a dataset.")
    run.add_argument("--reference-column", help="Reference image column of --image-pairs. Default: reference_image.")
    run.add_argument("--target-column", help="Target image column of --image-pairs. Default: target_image.")
    run.add_argument("--max-items", type=positive_int, help="Use only the first N items of each source.")
    run.add_argument("--items-per-shard", type=positive_int, help="Items per output shard. Default: 1000.")
    run.add_argument("--chunk-size", type=positive_int, help="Items that go through every stage together. Default: 16.")
    run.add_argument("--seed", type=non_negative_int, help="Recipe seed. Default: 0.")
    run.add_argument("--split", help="Split to write. Default: train.")
    run.add_argument("--image-format", choices=("jpeg", "png", "webp"), help="Default: jpeg.")
    run.add_argument("--config", help="A JSON recipe (GenerationConfig.to_dict(), e.g. generation/train/config.json's "
                     "'config'); flags given on the command line override it.")
    run.add_argument("--overwrite", action="store_true", help="Start again: replace this split's shards and records.")
    run.add_argument("--contact-sheet-rows", type=non_negative_int, default=48,
                     help="Rows in the HTML contact sheet (0: none). Default: 48.")
    run.add_argument("--no-progress", action="store_true", help="No progress bars.")


def _add_model_arguments(parser) -> None:
    models = parser.add_argument_group("models (names or folders)")
    models.add_argument("--clip-model", help="CLIP for the keyword band and the filters. Default: "
                        "openai/clip-vit-large-patch14.")
    models.add_argument("--sd-model", action="append", help="Stable Diffusion pipeline; repeat for several (each item "
                        "draws one). Default: stable-diffusion-v1-5/stable-diffusion-v1-5.")
    models.add_argument("--safety-checker", help="Default: CompVis/stable-diffusion-safety-checker.")
    models.add_argument("--clipseg-model", help="Default: CIDAS/clipseg-rd64-refined.")
    models.add_argument("--caption-editor", help="Causal LM for LLM triplets (see examples/generation/).")
    models.add_argument("--caption-editor-adapter", help="A peft adapter folder on top of --caption-editor.")
    models.add_argument("--vlm", help="Image-text-to-text model for MTST / FACap.")
    models.add_argument("--instruction-llm", help="Causal LM that writes FACap's modification texts.")
    models.add_argument("--tagger", choices=("auto", "spacy", "builtin"), default=None,
                        help="Part-of-speech tagger for keyword triplets. Default: auto (spaCy when installed).")
    models.add_argument("--spacy-model", default=None, help="spaCy pipeline. Default: en_core_web_sm.")
    models.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="Diffusion pipelines and language models. Default: their saved dtype.")


def _add_stage_arguments(parser) -> None:
    keyword = parser.add_argument_group("keyword triplets")
    keyword.add_argument("--keyword-band", nargs=2, type=_similarity, metavar=("LOW", "HIGH"),
                         help="CLIP text similarity of a replacement keyword. Default: 0.5 0.7.")
    keyword.add_argument("--min-term-count", type=positive_int, help="Drop object terms seen fewer times. Default: 1.")
    keyword.add_argument("--max-candidates", type=positive_int, help="Replacements kept per term. Default: 64.")
    keyword.add_argument("--keyword-vocabulary", help="generation/<split>/keyword_vocabulary.parquet of an earlier run "
                         "(skips tagging every caption and the CLIP band search).")
    llm = parser.add_argument_group("LLM triplets")
    llm.add_argument("--llm-batch-size", type=positive_int, help="Captions per generate() call. Default: 16.")
    llm.add_argument("--temperature", type=float, help="Sampling temperature. Default: 1.0.")
    llm.add_argument("--top-p", type=_unit, help="Nucleus sampling. Default: 0.9.")
    llm.add_argument("--max-new-tokens", type=positive_int, help="Per LLM / VLM answer. Default: 96 (LLM), 48 (VLM).")
    image = parser.add_argument_group("image pairs (Stable Diffusion + Prompt-to-Prompt)")
    image.add_argument("--num-seeds", type=positive_int, help="Image pairs per caption triplet. Default: 4.")
    image.add_argument("--keep-per-triplet", type=positive_int, help="Surviving pairs kept per triplet. Default: 1.")
    image.add_argument("--num-inference-steps", type=positive_int, help="Default: 50.")
    image.add_argument("--guidance-scale", type=float, help="Default: 7.5.")
    image.add_argument("--height", type=positive_int, help="Default: the pipeline's.")
    image.add_argument("--width", type=positive_int, help="Default: the pipeline's.")
    image.add_argument("--cross-replace", type=_unit, help="Share of steps with shared cross-attention. Default: 0.8.")
    image.add_argument("--self-replace-range", nargs=2, type=_unit, metavar=("LOW", "HIGH"),
                       help="Share of steps with shared self-attention, drawn per sample. Default: 0.1 0.9.")
    image.add_argument("--image-batch-size", type=positive_int, help="Pairs per denoising batch. Default: 4.")
    filters = parser.add_argument_group("filters (a number in [-1, 1], or 'off')")
    filters.add_argument("--min-image-caption", type=_threshold, help="Default: 0.2.")
    filters.add_argument("--min-image-image", type=_threshold, help="Default: 0.70.")
    filters.add_argument("--min-directional", type=_threshold, help="Default: 0.2.")
    filters.add_argument("--min-keyword-image", type=_threshold, help="Keyword triplets. Default: 0.20.")
    filters.add_argument("--min-instruction-image", type=_threshold, help="LLM triplets. Default: 0.20.")
    filters.add_argument("--no-nsfw-filter", action="store_true", help="Skip the safety checker.")
    filters.add_argument("--filter-given-pairs", action="store_true",
                         help="Apply the CLIP filters to MTST / FACap pairs too (default: NSFW only).")
    masks = parser.add_argument_group("masks")
    masks.add_argument("--no-masks", action="store_true", help="Skip ClipSeg masks.")
    masks.add_argument("--mask-threshold", type=_unit, help="On ClipSeg's probability. Default: 0.5.")
    pairs = parser.add_argument_group("image-pair texts (MTST, FACap)")
    pairs.add_argument("--mtst-prompt", help="Asked of the VLM with (reference, target).")
    pairs.add_argument("--no-reverse-text", action="store_true", help="MTST: skip the reverse text.")
    pairs.add_argument("--describe-prompt", help="FACap: asked of the VLM for each image.")
    pairs.add_argument("--facap-prompt", help="FACap: given to the LLM; must hold {reference} and {target}.")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="Generate CIR triplets (SynthTriplets18M recipe, MTST, FACap).",
        description="Generate composed image retrieval triplets: keyword or LLM caption triplets drawn by Stable "
        "Diffusion with Prompt-to-Prompt, CLIP and NSFW filters, ClipSeg masks (the CompoDiff SynthTriplets18M "
        "recipe), or MTST / FACap texts for given image pairs; Parquet shards in the SynthTriplets layout with a "
        "dataset card and an HTML contact sheet. Sharded over accelerate processes; run again to resume.",
    )
    _add_run_arguments(parser)
    _add_model_arguments(parser)
    _add_stage_arguments(parser)
    parser.set_defaults(func=run)


# flag -> (stage, field); None values are left as the recipe has them
_STAGE_FLAGS = {
    "keyword_band": ("keyword", "similarity_band"), "min_term_count": ("keyword", "min_term_count"),
    "max_candidates": ("keyword", "max_candidates"), "tagger": ("keyword", "tagger"),
    "keyword_vocabulary": ("keyword", "vocabulary"),
    "spacy_model": ("keyword", "spacy_model"),
    "llm_batch_size": ("llm", "batch_size"), "temperature": ("llm", "temperature"), "top_p": ("llm", "top_p"),
    "num_seeds": ("image", "num_seeds"), "keep_per_triplet": ("image", "keep_per_triplet"),
    "num_inference_steps": ("image", "num_inference_steps"), "guidance_scale": ("image", "guidance_scale"),
    "height": ("image", "height"), "width": ("image", "width"), "cross_replace": ("image", "cross_replace"),
    "self_replace_range": ("image", "self_replace_range"), "image_batch_size": ("image", "batch_size"),
    "min_image_caption": ("filters", "image_caption"), "min_image_image": ("filters", "image_image"),
    "min_directional": ("filters", "directional"), "min_keyword_image": ("filters", "keyword_image"),
    "min_instruction_image": ("filters", "instruction_image"), "mask_threshold": ("masks", "threshold"),
    "mtst_prompt": ("pairs", "mtst_prompt"), "describe_prompt": ("pairs", "describe_prompt"),
    "facap_prompt": ("pairs", "facap_prompt"),
}
_RUN_FLAGS = ("captions", "caption_column", "image_pairs", "max_items", "items_per_shard", "chunk_size", "seed",
              "split", "image_format")


def build_config(args):
    """The :class:`GenerationConfig` of the command line (on top of ``--config`` when given)."""
    from diffusers_cir.checks import check_file
    from diffusers_cir.generation.config import GenerationConfig

    config = GenerationConfig()
    if args.config:
        with open(check_file(args.config, "--config"), encoding="utf-8") as handle:
            values = json.load(handle)
        config = GenerationConfig.from_dict(values.get("config", values))
    if args.strategy:
        config.strategies = tuple(args.strategy)
    for name in _RUN_FLAGS:
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    for flag, column in (("reference_column", "reference_image"), ("target_column", "target_image")):
        if getattr(args, flag) is not None:
            config.pair_columns = {**config.pair_columns, column: getattr(args, flag)}
    for flag, (stage, name) in _STAGE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            value = None if value == OFF else tuple(value) if isinstance(value, list) else value
            setattr(getattr(config, stage), name, value)
    if args.max_new_tokens is not None:
        config.llm.max_new_tokens = config.pairs.max_new_tokens = args.max_new_tokens
    config.filters.nsfw = config.filters.nsfw and not args.no_nsfw_filter
    config.filters.filter_given_pairs = config.filters.filter_given_pairs or args.filter_given_pairs
    config.masks.enabled = config.masks.enabled and not args.no_masks
    config.pairs.reverse = config.pairs.reverse and not args.no_reverse_text
    return config.check()


def _model_names(args) -> dict:
    return {
        "clip": args.clip_model, "stable_diffusion": args.sd_model, "safety_checker": args.safety_checker,
        "clipseg": args.clipseg_model, "caption_editor": args.caption_editor,
        "caption_editor_adapter": args.caption_editor_adapter, "vlm": args.vlm,
        "instruction_llm": args.instruction_llm, "tagger": args.tagger, "spacy_model": args.spacy_model,
    }


def _check_demo_flags(args) -> None:
    """--demo brings its own inputs, models and recipe: any of those flags with it would be silently ignored."""
    ignored = [f"--{name.replace('_', '-')}" for name in ("strategy", "config", "reference_column", "target_column")
               + _RUN_FLAGS if getattr(args, name) is not None]
    ignored += [f"--{name.replace('_', '-')}" for name, value in _model_names(args).items() if value]
    ignored += [f"--{flag.replace('_', '-')}" for flag in (*_STAGE_FLAGS, "max_new_tokens")
                if getattr(args, flag) is not None]
    ignored += [f"--{flag.replace('_', '-')}" for flag in ("no_nsfw_filter", "no_masks", "filter_given_pairs",
                                                           "no_reverse_text") if getattr(args, flag)]
    ignored += ["--dtype"] if args.dtype != "auto" else []
    ignored = list(dict.fromkeys(ignored))
    if ignored:
        raise ValueError(f"{', '.join(ignored)} cannot be used with --demo (it runs tiny built-in models on its own "
                         "inputs and recipe): drop them, or drop --demo.")


def run(args: argparse.Namespace) -> int:
    if args.demo:
        _check_demo_flags(args)
        from diffusers_cir.generation.demo import run_demo

        result = run_demo(args.output, overwrite=args.overwrite, progress=not args.no_progress,
                          contact_sheet_rows=args.contact_sheet_rows)
    else:
        config = build_config(args)
        from diffusers_cir.generation.components import load_components
        from diffusers_cir.generation.runner import open_sources, process_state, run_generation

        state = process_state()
        with state.main_process_first():
            open_sources(config)  # a missing or malformed source fails before any model loads
        components = load_components(config, _model_names(args), device=state.device, torch_dtype=args.dtype)
        result = run_generation(config, components, args.output, overwrite=args.overwrite,
                                progress=not args.no_progress, contact_sheet_rows=args.contact_sheet_rows)
    if result is not None and _is_main_process():
        print(result.format())
    return 0


def _is_main_process() -> bool:
    from diffusers_cir.generation.runner import process_state

    return process_state().is_main_process
