# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The command line of the composition-network trainer (``examples/train_fusion.py``, ``diffusers-cir demo``).

``--method`` chooses a preset (:mod:`.fusion_methods`): the pipeline class, head, objective and the defaults of the
other flags, which ``--help`` shows for that method (``--method scot --help``) with where each comes from. Shared
groups (optimization, EMA, checkpointing, logging) come from :mod:`.arguments`; every problem is one line
``error:`` while the command line is read.
"""

from __future__ import annotations

import argparse
import re

from ..checks import argparse_type, check_float
from .arguments import (
    DROPOUT,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    TrainingArgumentParser,
    add_checkpointing_arguments,
    add_ema_arguments,
    add_flag,
    add_optimization_arguments,
    add_tracking_arguments,
    flag,
    json_object,
    usage_errors,
)
from .fusion_methods import FUSION_HEADS, FUSION_METHODS, OBJECTIVES
from .outputs import check_output_dir

__all__ = ["LAYOUTS", "RUN_OUTPUTS", "VALIDATION_LOG", "build_argument_parser", "check_args", "parse_args"]

VALIDATION_LOG = "validation_log.jsonl"
RUN_OUTPUTS = ("model_index.json", VALIDATION_LOG)
LAYOUTS = ("synthtriplets", "text_triplets")
# Linear layers LoRA adapts by default, per backbone (attention and MLP projections of each tower).
DEFAULT_LORA_TARGETS = {
    "clip": r".*(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    "open_clip": r".*(c_fc|c_proj|out_proj)",
    "blip2": r".*(query|key|value|qkv|projection|dense|fc1|fc2)",
}
OUR_CHOICE = "our choice"
# diffusers_cir.retrieval.image_processing_targetpad's IMAGE_PREPROCESSINGS (not imported: it imports transformers).
IMAGE_PREPROCESSINGS = ("clip", "targetpad")


def _recall_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return ks


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"expected a valid regular expression, got {text!r} ({error})") from None
    return text


def _source(method, dest: str) -> str:
    return method.sources.get(dest, OUR_CHOICE)


# --------------------------------------------------------------------------------------------------- the parser
def _add_model_arguments(parser, method) -> None:
    model = parser.add_argument_group("model")
    add_flag(model, "method", default=method.name, choices=sorted(FUSION_METHODS),
             help="The preset: pipeline class, head, objective and the defaults below ('--method NAME --help' shows "
             "that method's). " + "; ".join(f"{m.name}: {m.description}" for m in FUSION_METHODS.values()) + ".")
    add_flag(model, "pretrained_model_name_or_path", default=None,
             help="The encoders (and, for a composition pipeline folder, the head to go on training): a saved "
             "composition pipeline, a transformers CLIP checkpoint (both towers), or a BLIP-2 checkpoint "
             "(Blip2ForImageTextRetrieval: its Q-Former towers). Not with --open-clip-model.")
    add_flag(model, "open_clip_model", default=None, help="An open_clip model name (e.g. RN50x4, CLIP4Cir's backbone).")
    add_flag(model, "open_clip_pretrained", default=None,
             help="Its weights: a local checkpoint file or an open_clip pretrained tag (offline: a file).")
    add_flag(model, "revision", default=None, help="Hub revision of --pretrained-model-name-or-path.")
    _add_preprocessing_arguments(model, method)
    add_flag(model, "head", default=method.head, choices=sorted(FUSION_HEADS),
             help=f"The fusion head (default: {method.name}'s). Ignored when the pretrained folder holds a head.")
    add_flag(model, "projection_dim", type=POSITIVE_INT, default=None,
             help="Head projection width (default: 4x the feature width, CLIP4Cir's ratio: 2560 for RN50x4's 640).")
    add_flag(model, "hidden_dim", type=POSITIVE_INT, default=None,
             help="Head hidden width (default: 8x the feature width, CLIP4Cir's ratio: 5120 for RN50x4).")
    add_flag(model, "head_dropout", type=DROPOUT, default=method.defaults["head_dropout"],
             help=f"Dropout in the head ({_source(method, 'head_dropout')}; not with fashionblip2's head).")
    add_flag(model, "num_matching_heads", type=POSITIVE_INT, default=4,
             help="fashionblip2: heads of the multi-head matching head (our choice: the paper's method section could "
             "not be read).")
    add_flag(model, "matching_head_dim", type=POSITIVE_INT, default=64,
             help="fashionblip2: width of each matching head's vector (our choice, as above).")


def _add_preprocessing_arguments(model, method) -> None:
    if method.image_preprocessing == "targetpad":
        default = ("targetpad when the run encodes images (the CLIP4Cir authors' default: --transform targetpad "
                   "--target-ratio 1.25 in combiner_train.py and clip_fine_tune.py), else (embeddings, or BLIP-2's square "
                   "resize) the encoders' own")
    else:
        default = f"the encoders' own ({OUR_CHOICE}; {method.name}'s authors' preprocessing was not checked)"
    add_flag(model, "image_preprocessing", default=None, choices=IMAGE_PREPROCESSINGS,
             help="How images become pixels, in training and in the saved pipeline (queries and gallery alike). clip: "
             "CLIP's shortest-side resize and centre crop (a target-pad processor of a loaded folder becomes a plain "
             "one); targetpad: CLIP4Cir's target pad first (an image whose long/short side ratio is at least "
             "--target-ratio is zero-padded on its short side towards it; diffusers_cir.TargetPadImageProcessor). "
             f"Default: {default}. On an embeddings configuration the features were made when the data was "
             "precomputed: when its dataset card records how (examples/precompute_embeddings.py), the saved pipeline "
             "preprocesses that way and a contradicting flag is refused; otherwise keep the preprocessing they were "
             "made with. Changing it changes gallery embeddings.")
    add_flag(model, "target_ratio", type=argparse_type(check_float, float, minimum=1.0), default=None,
             help="Target pad's ratio (implies --image-preprocessing targetpad; default: the loaded processor's, else "
             "1.25, the CLIP4Cir and CIReVL authors' value; 1 pads to a square).")


def _add_data_arguments(parser, method) -> None:
    data = parser.add_argument_group("data")
    add_flag(data, "train_data_dir", required=True, help="Training data: a dataset folder or Hub id (streamed).")
    add_flag(data, "layout", default="synthtriplets" if method.objective == "image" else "text_triplets",
             choices=LAYOUTS,
             help="synthtriplets: (reference, modification_text, target) with the reverse_modification_text column "
             "for MTST (diffusers_cir.data.schema); text_triplets: SCOT's (image, caption, modification_text, "
             "modified_caption) (diffusers_cir.data.text_triplets). The default follows the objective.")
    add_flag(data, "dataset_config_name", default=None,
             help="Configuration (default: the dataset card's default one). Embedding configurations train on "
             "precomputed image features; image ones encode pixels with the image tower.")
    add_flag(data, "train_split", default="train")
    add_flag(data, "column_mapping", type=json_object, default=None,
             help="JSON {layout column: your column}, e.g. SCOT on a SynthTriplets folder: "
             "'{\"image_embeds\": \"reference_image_embeds\", \"caption\": \"reference_caption\", "
             "\"modified_caption\": \"target_caption\"}'.")
    add_flag(data, "shuffle_buffer_size", type=NON_NEGATIVE_INT, default=1000,
             help="Rows shuffled within blocks of this size; resuming is exact either way (diffusers_cir.data.streaming).")
    add_flag(data, "dataloader_num_workers", type=NON_NEGATIVE_INT, default=0)
    add_flag(data, "train_batch_size", type=POSITIVE_INT, default=method.defaults["train_batch_size"],
             help=f"Triplets per device and step; the other rows of the batch are each query's negatives "
             f"({_source(method, 'train_batch_size')}).")


def _add_objective_arguments(parser, method) -> None:
    objective = parser.add_argument_group("objective")
    add_flag(objective, "objective", default=method.objective, choices=OBJECTIVES,
             help="image: contrast each query with the target images' features (CLIP4Cir, MTST); text: with the "
             "modified captions' text features (SCOT).")
    add_flag(objective, "temperature", type=POSITIVE_FLOAT, default=method.defaults["temperature"],
             help=f"Softmax temperature of the contrastive loss ({_source(method, 'temperature')}: logit scale "
             f"{1 / method.defaults['temperature']:.4g}).")
    add_flag(objective, "label_smoothing", type=argparse_type(check_float, float, minimum=0.0, maximum=1.0,
                                                              exclusive_maximum=True),
             default=method.defaults["label_smoothing"], help=f"({_source(method, 'label_smoothing')}).")
    add_flag(objective, "caption_negatives", action=argparse.BooleanOptionalAction,
             default=method.defaults["caption_negatives"],
             help=f"Text objective: each query's own original caption is one more negative "
             f"({_source(method, 'caption_negatives')}).")
    add_flag(objective, "reverse_text_weight", type=NON_NEGATIVE_FLOAT, default=method.defaults["reverse_text_weight"],
             help="MTST's prototype alignment: mean squared error between the first hop of (reference, text) and of "
             "(target, reverse text), the reverse branch detached, times this weight. Needs a two-hop head, image "
             f"targets and a reverse_modification_text column ({_source(method, 'reverse_text_weight')}).")
    add_flag(objective, "text_feature_cache_size", type=NON_NEGATIVE_INT, default=0,
             help="Keep the features of up to N distinct texts of the frozen text tower (not with its LoRA): much "
             "faster when texts repeat. A text's cached features come from the batch it was first encoded in, which "
             "differs from another batch in the last bits, so a resumed run is exact only without the cache (0).")


def _add_lora_arguments(parser) -> None:
    lora = parser.add_argument_group(
        "LoRA on the encoders (peft)", "fashionblip2 always adapts BLIP-2's Q-Former (its query and value projections "
        "unless --lora-target-modules says otherwise); the other methods adapt the towers named below.")
    add_flag(lora, "lora_image_encoder", action="store_true",
             help="Adapt the image tower with LoRA (needs an image configuration); merged into the saved tower, so "
             "the gallery side changes with it.")
    add_flag(lora, "lora_text_encoder", action="store_true", help="Adapt the text tower with LoRA.")
    add_flag(lora, "lora_rank", type=POSITIVE_INT, default=8)
    add_flag(lora, "lora_alpha", type=POSITIVE_FLOAT, default=8.0, help="The adapter's output is scaled by alpha / rank.")
    add_flag(lora, "lora_dropout", type=DROPOUT, default=0.0)
    add_flag(lora, "lora_target_modules", type=_regex, default=None,
             help="Regex of the linear layers to adapt (default per backbone: "
             + "; ".join(f"{kind}: {pattern}" for kind, pattern in DEFAULT_LORA_TARGETS.items())
             + "; fashionblip2: the Q-Former's query and value).")


def _add_validation_arguments(parser) -> None:
    validation = parser.add_argument_group("validation")
    add_flag(validation, "validation_data_dir", default=None,
             help="Dataset in the SynthTriplets layout whose `embeddings` configuration holds validation triplets "
             "(default: --train-data-dir); Recall@K of the pipeline's queries (diffusers_cir.retrieval, metrics).")
    add_flag(validation, "validation_split", default="validation")
    add_flag(validation, "validation_gallery_config", default="gallery",
             help="Configuration with the gallery (id, image_embeds); without it, the validation rows' images.")
    add_flag(validation, "validation_steps", type=POSITIVE_INT, default=None, help="Validate every N steps and at the end.")
    add_flag(validation, "num_validation_queries", type=POSITIVE_INT, default=1000)
    add_flag(validation, "validation_batch_size", type=POSITIVE_INT, default=256)
    add_flag(validation, "validation_recall_ks", type=_recall_ks, default=(1, 5, 10), help="Comma-separated K.")


def build_argument_parser(method: str = "clip4cir") -> argparse.ArgumentParser:
    """The parser with ``method``'s defaults."""
    preset = FUSION_METHODS[method]
    parser = TrainingArgumentParser(
        description="Train a composition network (CLIP4Cir Combiner, SCOT, MTST) over frozen encoders, or "
        "FashionBLIP-2 (BLIP-2's Q-Former with LoRA and multi-head matching), with accelerate. Defaults marked 'our "
        "choice' are not from a paper; the others name their source. The FashionBLIP-2 paper's method section could "
        "not be read, so all of fashionblip2's defaults are our choice.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_arguments(parser, preset)
    _add_data_arguments(parser, preset)
    _add_objective_arguments(parser, preset)
    _add_validation_arguments(parser)
    training = parser.add_argument_group("training")
    add_flag(training, "output_dir", default=f"{preset.name}-model")
    add_flag(training, "allow_tf32", action="store_true")
    optimization = add_optimization_arguments(
        parser, max_train_steps=10_000, lr_warmup_steps=0, max_grad_norm=1.0,
        adam_weight_decay=preset.defaults["adam_weight_decay"], seed=0)
    parser.set_defaults(learning_rate=preset.defaults["learning_rate"], lr_scheduler="constant")
    for action in optimization._group_actions:
        if action.dest in preset.sources or action.dest in ("learning_rate", "adam_weight_decay"):
            action.help = f"{action.help or ''} ({_source(preset, action.dest)}).".strip()
    add_ema_arguments(parser)
    add_checkpointing_arguments(parser, checkpointing_steps=1000)
    add_tracking_arguments(parser, report_to="auto", project_name="train_fusion")
    _add_lora_arguments(parser)
    return parser


def _check_fashionblip2_args(args: argparse.Namespace) -> None:
    fashionblip2 = args.method == "fashionblip2"
    if fashionblip2 != (args.head == "multi-head-matching"):
        raise ValueError(f"{flag('head')} multi-head-matching goes with --method fashionblip2 and only with it "
                         f"(got --method {args.method} {flag('head')} {args.head}).")
    if not fashionblip2:
        return
    if args.open_clip_model is not None:
        raise ValueError(f"--method fashionblip2 fine-tunes BLIP-2: pass a BLIP-2 checkpoint or a FashionBLIP2Pipeline "
                         f"folder as {flag('pretrained_model_name_or_path')}, not {flag('open_clip_model')}.")
    for name in ("lora_text_encoder", "lora_image_encoder", "use_ema"):
        if getattr(args, name):
            raise ValueError(f"{flag(name)} is not for --method fashionblip2, which always trains LoRA on the Q-Former "
                             "(see --lora-target-modules) and the matching head.")
    if args.head_dropout:
        raise ValueError(f"{flag('head_dropout')} {args.head_dropout}: fashionblip2's matching head has no dropout.")
    if args.image_preprocessing == "targetpad" or args.target_ratio is not None:
        raise ValueError(f"{flag('image_preprocessing')} targetpad / {flag('target_ratio')}: fashionblip2 keeps BLIP-2's "
                         "own image processor (a square resize, which target padding does not go before).")
    if args.validation_steps is not None:
        raise ValueError(f"{flag('validation_steps')}: the validation set holds embeddings, and FashionBLIP-2 composes "
                         "from the reference's pixels; evaluate the saved folder with `diffusers-cir evaluate`.")


def check_args(args: argparse.Namespace) -> None:
    """The checks between flags (each flag's own value is checked by its type); a ``ValueError`` naming them."""
    _check_fashionblip2_args(args)
    if (args.pretrained_model_name_or_path is None) == (args.open_clip_model is None):
        raise ValueError(f"Pass exactly one of {flag('pretrained_model_name_or_path')} (a composition pipeline, CLIP or "
                         f"BLIP-2 folder) and {flag('open_clip_model')} (an open_clip CLIP).")
    if args.target_ratio is not None and args.image_preprocessing == "clip":
        raise ValueError(f"{flag('target_ratio')} {args.target_ratio} is target pad's ratio: it goes with "
                         f"{flag('image_preprocessing')} targetpad, not clip.")
    if args.open_clip_pretrained is not None and args.open_clip_model is None:
        raise ValueError(f"{flag('open_clip_pretrained')} gives the weights of {flag('open_clip_model')}: pass both.")
    if args.objective == "text" and args.layout != "text_triplets":
        raise ValueError(f"{flag('objective')} text reads modified captions: it needs {flag('layout')} text_triplets "
                         "(a SynthTriplets folder serves through --column-mapping, see --help).")
    if args.objective == "image" and args.layout != "synthtriplets":
        raise ValueError(f"{flag('objective')} image needs target images: {flag('layout')} synthtriplets.")
    if args.reverse_text_weight > 0 and args.objective != "image":
        raise ValueError(f"{flag('reverse_text_weight')} aligns the prototype of (target image, reverse text): it needs "
                         f"{flag('objective')} image.")
    if args.caption_negatives and args.objective != "text":
        raise ValueError(f"{flag('caption_negatives')} belongs to {flag('objective')} text; pass --no-caption-negatives.")
    if args.lora_text_encoder and args.use_ema:
        raise ValueError(f"{flag('use_ema')} keeps an average of the head only: it cannot go with LoRA on the towers.")
    if args.lora_image_encoder and args.use_ema:
        raise ValueError(f"{flag('use_ema')} keeps an average of the head only: it cannot go with LoRA on the towers.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked arguments with the chosen method's defaults; a bad one exits with a one-line ``error:`` (status
    2) before anything is loaded."""
    first = TrainingArgumentParser(add_help=False)
    add_flag(first, "method", default="clip4cir", choices=sorted(FUSION_METHODS))
    method = first.parse_known_args(argv)[0].method
    parser = build_argument_parser(method)
    args = parser.parse_args(argv)
    with usage_errors(parser):
        check_args(args)
        check_output_dir(args.output_dir, args.resume_from_checkpoint, args.max_train_steps, RUN_OUTPUTS)
    return args
