"""`diffusers-cir convert compodiff ...`: released checkpoints to diffusers folders."""

from __future__ import annotations

import argparse

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def add_compodiff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-path", "--checkpoint_path", dest="checkpoint_path", required=True, help="Released checkpoint folder (config.json + pytorch_model.bin) or weights file.")
    parser.add_argument("--output", "--output-path", "--output_path", dest="output_path", required=True, help="Folder to write the diffusers pipeline to.")
    parser.add_argument("--text-encoder-path", "--text_encoder_path", dest="text_encoder_path", default=None, help="transformers CLIP text model folder (hidden width 1280 for the releases).")
    parser.add_argument("--image-encoder-path", "--image_encoder_path", dest="image_encoder_path", default=None, help="transformers CLIPVisionModelWithProjection folder (ViT-L/14 for the releases).")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Precision of the saved weights.")
    _add_overwrite_argument(parser)


def _add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true",
        help="Replace an output folder that holds an earlier conversion (it is swapped for the new one at the end). "
        "Without it a non-empty output folder is refused; a folder that is not a conversion is never replaced.",
    )


def run_compodiff(args: argparse.Namespace) -> int:
    import torch

    from ..conversion import convert_compodiff_checkpoint_to_pipeline
    from ..conversion.output import check_output_folder

    check_output_folder(args.output_path, args.overwrite, flag="--overwrite")  # the library would say overwrite=True
    pipe = convert_compodiff_checkpoint_to_pipeline(
        args.checkpoint_path,
        args.output_path,
        text_encoder_path=args.text_encoder_path,
        image_encoder_path=args.image_encoder_path,
        torch_dtype=getattr(torch, DTYPES[args.dtype]),
        overwrite=args.overwrite,
    )
    count = sum(parameter.numel() for parameter in pipe.transformer.parameters())
    print(f"Wrote {args.output_path}: CompoDiffTransformer with {count:,} parameters ({dict(pipe.transformer.config)['num_layers']} layers).")
    return 0


def add_lincir_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-path", "--checkpoint_path", dest="checkpoint_path", required=True, help="The released .pt file (e.g. lincir_large.pt).")
    parser.add_argument("--output", "--output-dir", "--output_dir", "--output_path", dest="output_dir", required=True,
                        help="Folder to write the projection (or, with --clip-model-name-or-path, the pipeline) to.")
    parser.add_argument("--clip-model-name-or-path", "--clip_model_name_or_path", dest="clip_model_name_or_path", default=None, help="Build a full LinCIRPipeline with this CLIP model.")
    # The pipeline options below need --clip-model-name-or-path (without it only the projection is saved).
    parser.add_argument("--tokenizer-name-or-path", "--tokenizer_name_or_path", dest="tokenizer_name_or_path", default=None)
    parser.add_argument("--no-image-encoder", "--no_image_encoder", dest="no_image_encoder", action="store_true", help="Leave the CLIP vision tower out of the pipeline.")
    parser.add_argument("--dropout", type=float, default=None, help="Dropout to record (default: the method's value).")
    parser.add_argument("--activation", default=None, help="Override the activation (gelu for phi, relu for Pic2Word).")
    parser.add_argument("--normalize-input", "--normalize_input", dest="normalize_input", action="store_true", help="The checkpoint was trained with --l2_normalize.")
    parser.add_argument("--prompt-template", "--prompt_template", dest="prompt_template", default=None, help="Default: 'a photo of $ that {text}'.")
    parser.add_argument("--placeholder-token", "--placeholder_token", dest="placeholder_token", default=None, help="Default: '$'.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Precision of the saved weights.")
    _add_overwrite_argument(parser)


def _check_lincir_pipeline_arguments(args: argparse.Namespace) -> tuple[str, str]:
    """The pipeline's template and placeholder, checked before anything loads; pipeline options without
    --clip-model-name-or-path (only the projection is saved then) are refused instead of ignored."""
    from ..pipelines.pipeline_lincir import DEFAULT_PROMPT_TEMPLATE, _check_prompt_template

    if args.clip_model_name_or_path is None:
        given = [flag for flag, value in (("--tokenizer-name-or-path", args.tokenizer_name_or_path),
                                          ("--no-image-encoder", args.no_image_encoder or None),
                                          ("--prompt-template", args.prompt_template),
                                          ("--placeholder-token", args.placeholder_token)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'configures' if len(given) == 1 else 'configure'} the pipeline built "
                             "with --clip-model-name-or-path; without it only the projection is saved.")
    template = DEFAULT_PROMPT_TEMPLATE if args.prompt_template is None else args.prompt_template
    token = "$" if args.placeholder_token is None else args.placeholder_token
    try:
        _check_prompt_template(template)
    except ValueError as error:
        raise ValueError(f"--prompt-template: {error}") from None
    if token not in template.format(text=""):
        raise ValueError(f"--prompt-template {template!r} has no {token!r} (--placeholder-token) where the reference "
                         "image goes: every query of the saved pipeline would be refused.")
    return template, token


def run_lincir(args: argparse.Namespace) -> int:
    import torch
    from diffusers.models.activations import ACT2CLS

    from ..conversion.lincir import build_lincir_pipeline, convert_lincir_phi_checkpoint, lincir_conversion_card
    from ..conversion.output import check_output_folder, replace_output_folder

    check_output_folder(args.output_dir, args.overwrite, flag="--overwrite")  # before loading anything
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}.")
    if args.activation is not None and args.activation not in ACT2CLS:
        raise ValueError(f"--activation must be one of {', '.join(sorted(ACT2CLS))}, got {args.activation!r}.")
    prompt_template, placeholder_token = _check_lincir_pipeline_arguments(args)
    dtype = getattr(torch, DTYPES[args.dtype])
    phi = convert_lincir_phi_checkpoint(
        args.checkpoint_path, dropout=args.dropout, activation=args.activation,
        normalize_input=args.normalize_input, torch_dtype=dtype,
    )
    config = phi.config
    print(
        f"phi: {config.input_dim} -> {config.hidden_dim} x{config.num_hidden_layers} -> {config.output_dim} "
        f"({config.activation}, dropout {config.dropout})"
    )
    if args.clip_model_name_or_path is None:
        with replace_output_folder(args.output_dir, args.overwrite, flag="--overwrite") as staging:
            phi.save_pretrained(staging, safe_serialization=True)
        print(f"Saved the projection to {args.output_dir}")
        return 0
    pipeline = build_lincir_pipeline(
        phi, args.clip_model_name_or_path, tokenizer_name_or_path=args.tokenizer_name_or_path,
        with_image_encoder=not args.no_image_encoder, torch_dtype=dtype,
        prompt_template=prompt_template, placeholder_token=placeholder_token,
    )
    try:  # needs the tokenizer: a token it splits would make the saved pipeline refuse every query
        pipeline.placeholder_token_id
    except ValueError as error:
        raise ValueError(f"--placeholder-token: {error}") from None
    card = lincir_conversion_card(
        args.checkpoint_path, args.output_dir, args.clip_model_name_or_path, args.tokenizer_name_or_path,
        args.no_image_encoder, args.normalize_input, args.dropout, args.activation, args.prompt_template,
        args.placeholder_token, dtype,
    )
    with replace_output_folder(args.output_dir, args.overwrite, flag="--overwrite") as staging:
        pipeline.save_pretrained(staging, safe_serialization=True, model_card=card)
    print(f"Saved the LinCIR pipeline to {args.output_dir}")
    return 0


def add_magiclens_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-path", required=True, help="The released .pkl (magic_lens_clip_base.pkl or magic_lens_clip_large.pkl); read without unpickling.")
    stated = parser.add_mutually_exclusive_group()
    stated.add_argument("--model-size", choices=("base", "large"), default=None, help="What the checkpoint is (checked against its weights; without it the architecture is read from them).")
    stated.add_argument("--config-path", default=None, help="An authors'-style config.json ('magiclens' and 'clip' sections, 'preprocess_size') stating what the checkpoint is.")
    parser.add_argument("--output", required=True, help="Folder to write the MagicLensPipeline to.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Precision of the saved weights.")
    _add_overwrite_argument(parser)


def run_magiclens(args: argparse.Namespace) -> int:
    import torch

    from ..conversion.magiclens import convert_magiclens_checkpoint_to_pipeline

    pipe = convert_magiclens_checkpoint_to_pipeline(
        args.checkpoint_path, args.output, model_size=args.model_size, config_path=args.config_path,
        torch_dtype=getattr(torch, DTYPES[args.dtype]), overwrite=args.overwrite, overwrite_flag="--overwrite",
    )
    models = [pipe.image_encoder, pipe.text_encoder, pipe.fusion]
    count = sum(parameter.numel() for model in models for parameter in model.parameters())
    print(f"Wrote {args.output}: MagicLensPipeline with {count:,} parameters (embedding width {pipe.embedding_dim}).")
    return 0


def add_bgevl_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-path", required=True, help="The released folder (BAAI/BGE-VL-base or BAAI/BGE-VL-large: config.json, model.safetensors, tokenizer and preprocessor files).")
    parser.add_argument("--output", required=True, help="Folder to write the BGEVLPipeline to.")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="Precision of the saved weights (default: the checkpoint's).")
    _add_overwrite_argument(parser)


def run_bgevl(args: argparse.Namespace) -> int:
    import torch

    from ..conversion.bgevl import convert_bgevl_checkpoint_to_pipeline

    pipe = convert_bgevl_checkpoint_to_pipeline(
        args.checkpoint_path, args.output, torch_dtype=None if args.dtype is None else getattr(torch, DTYPES[args.dtype]),
        overwrite=args.overwrite, overwrite_flag="--overwrite",
    )
    count = sum(parameter.numel() for model in (pipe.text_encoder, pipe.image_encoder) for parameter in model.parameters())
    print(f"Wrote {args.output}: BGEVLPipeline with {count:,} parameters (embedding width {pipe.embedding_dim}).")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="Convert released checkpoints to diffusers folders.")
    kinds = parser.add_subparsers(dest="kind", metavar="MODEL", required=True)
    compodiff = kinds.add_parser("compodiff", help="A released CompoDiff checkpoint (navervision/CompoDiff-*).")
    add_compodiff_arguments(compodiff)
    compodiff.set_defaults(func=run_compodiff)
    lincir = kinds.add_parser("lincir", help="A released LinCIR / SEARLE phi or Pic2Word img2text checkpoint (.pt).")
    add_lincir_arguments(lincir)
    lincir.set_defaults(func=run_lincir)
    magiclens = kinds.add_parser("magiclens", help="A released MagicLens checkpoint (magic_lens_clip_{base,large}.pkl).")
    add_magiclens_arguments(magiclens)
    magiclens.set_defaults(func=run_magiclens)
    bgevl = kinds.add_parser("bgevl", help="A released BGE-VL-CLIP folder (BAAI/BGE-VL-base, BAAI/BGE-VL-large); AutoCIRPipeline also loads it as it is.")
    add_bgevl_arguments(bgevl)
    bgevl.set_defaults(func=run_bgevl)
