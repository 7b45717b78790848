"""Training: what both trainers share, and the CompoDiff loop (``diffusers-cir demo`` trains with it too).

Shared by ``examples/train_compodiff.py`` and ``examples/train_lincir.py``:

* :mod:`.arguments`: flag groups (optimization, EMA, checkpointing, logging), kebab-case flags with their snake_case
  aliases, value types from :mod:`diffusers_cir.checks`, one-line ``error:`` reports (exit status 2);
* :mod:`.outputs`: the ``--output-dir`` policy (no new run over an earlier run's checkpoints or final model);
* :mod:`.checkpoints`: ``checkpoint-<step>`` folders written whole or not at all, with checksums verified on resume;
* :mod:`.state`: loop state, EMA and random states as safetensors + JSON (no pickle in a checkpoint is unpickled);
* :mod:`.trackers`: accelerator, logging and experiment trackers;
* :mod:`.components`: frozen encoders, the trained model, optimizer, LR schedule and EMA.

CompoDiff's own parts:

* :mod:`.conditioning`: the three objectives, classifier-free condition dropout, text encoding (as the pipeline does);
* :mod:`.losses`: x0-prediction MSE with the scheduler's ``add_noise``;
* :mod:`.masking`: random box masks and masked-image embeddings for the masked objective;
* :mod:`.validation`: composed queries from the pipeline and Recall@K from :mod:`diffusers_cir.metrics`;
* :mod:`.compodiff_arguments` and :mod:`.train_compodiff`: its command line and the accelerate training loop.
"""

from .checkpoints import list_checkpoints
from .compodiff_arguments import build_argument_parser, parse_args
from .conditioning import (
    OBJECTIVES,
    CachedTextEncoder,
    ConditionDropout,
    ObjectiveRatios,
    encode_text_hidden_states,
    text_attention_mask,
)
from .losses import compodiff_loss, sample_timesteps
from .masking import masked_image_embeds, random_box_masks
from .train_compodiff import main
from .validation import RetrievalSet, evaluate_composed_retrieval, recall_of_queries

__all__ = [
    "OBJECTIVES",
    "CachedTextEncoder",
    "ConditionDropout",
    "ObjectiveRatios",
    "RetrievalSet",
    "build_argument_parser",
    "compodiff_loss",
    "encode_text_hidden_states",
    "evaluate_composed_retrieval",
    "list_checkpoints",
    "main",
    "masked_image_embeds",
    "parse_args",
    "random_box_masks",
    "recall_of_queries",
    "sample_timesteps",
    "text_attention_mask",
]
