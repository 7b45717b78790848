"""Training CompoDiff: the loop shared by ``examples/train_compodiff.py`` and ``diffusers-cir demo``, and its parts.

* :mod:`.conditioning`: the three objectives, classifier-free condition dropout, text encoding (as the pipeline does);
* :mod:`.losses`: x0-prediction MSE with the scheduler's ``add_noise``;
* :mod:`.masking`: random box masks and masked-image embeddings for the masked objective;
* :mod:`.validation`: composed queries from the pipeline and Recall@K from :mod:`diffusers_cir.metrics`;
* :mod:`.train_compodiff`: arguments, checkpoint handling and the accelerate training loop.
"""

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
from .train_compodiff import build_argument_parser, list_checkpoints, main, parse_args
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
