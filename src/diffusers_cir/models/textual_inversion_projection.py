"""The projection "phi" of the textual-inversion family of zero-shot CIR methods (LinCIR, SEARLE, Pic2Word).

phi maps a CLIP embedding in the joint image/text space (width ``P``, the CLIP projection width) to a
*pseudo word*: a vector in the text tower's token-embedding space (width ``H``, the text hidden width).
The pseudo word is then written at the placeholder position of a prompt such as
``"a photo of $ that is red"`` and encoded by the frozen CLIP text tower (see
:class:`~diffusers_cir.pipelines.LinCIRPipeline`).

The three published networks share one topology, an MLP with ``num_hidden_layers`` hidden linears of width
``hidden_dim`` followed by an output linear:

===========  =======================================  ==========  =======  =============================
method       hidden layers                            activation  dropout  released checkpoint layout
===========  =======================================  ==========  =======  =============================
LinCIR       ``P -> 4P -> 4P`` (2 hidden), ``-> H``   GELU        0.5      ``{'Phi': {'layers.{0,3,6}.*'}}``
SEARLE       ``P -> 4P -> 4P`` (2 hidden), ``-> H``   GELU        0.5      ``{'Phi': {'layers.{0,3,6}.*'}}``
Pic2Word     ``P -> 512 -> 512`` (2 hidden), ``-> H``  ReLU        0.1      ``{'state_dict_img2text': ...}``
===========  =======================================  ==========  =======  =============================

Pic2Word applies dropout before its ReLU and LinCIR after its GELU; dropout multiplies by a non-negative
factor, so it commutes with ReLU and the single ``activation -> dropout`` order here is exact for both.
Converters for the released files live in :mod:`diffusers_cir.conversion.lincir`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import ACT2CLS, get_activation
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ._dtype_cast import QuietDtypeCastMixin, compute_dtype


@dataclass
class TextualInversionProjectionOutput(BaseOutput):
    """Output of :class:`TextualInversionProjection`.

    Args:
        pseudo_tokens (`torch.Tensor` of shape `(batch_size, output_dim)`):
            One pseudo-word embedding per input embedding, in the text tower's token-embedding space.
    """

    pseudo_tokens: torch.Tensor


class TextualInversionProjection(QuietDtypeCastMixin, ModelMixin, ConfigMixin):
    r"""
    phi: CLIP joint-space embedding -> pseudo-word token embedding (LinCIR / SEARLE / Pic2Word).

    Args:
        input_dim (`int`, defaults to 768):
            Width of the input embedding: the CLIP projection width (768 for ViT-L/14, 1280 for ViT-bigG/14).
        hidden_dim (`int`, defaults to 3072):
            Width of the hidden layers (LinCIR and SEARLE use ``4 * input_dim``, Pic2Word 512).
        output_dim (`int`, defaults to 768):
            Width of the pseudo token: the text tower's hidden size (768 for ViT-L/14, 1280 for ViT-bigG/14).
        num_hidden_layers (`int`, defaults to 2):
            Number of hidden linear layers, each followed by the activation and dropout.
        activation (`str`, defaults to `"gelu"`):
            Activation after every hidden layer: `"gelu"` (LinCIR, SEARLE) or `"relu"` (Pic2Word); any name
            :func:`diffusers.models.activations.get_activation` knows.
        dropout (`float`, defaults to 0.5):
            Dropout probability after every activation (training only).
        normalize_input (`bool`, defaults to `False`):
            L2-normalise the input before the first layer. The released LinCIR, SEARLE and Pic2Word weights
            take the raw (unnormalised) CLIP embedding; LinCIR's ``--l2_normalize`` training option sets this.

    Example:
        >>> import torch
        >>> from diffusers_cir.models.textual_inversion_projection import TextualInversionProjection
        >>> phi = TextualInversionProjection(input_dim=24, hidden_dim=96, output_dim=32).eval()
        >>> phi(torch.randn(3, 24)).pseudo_tokens.shape
        torch.Size([3, 32])
    """

    @register_to_config
    def __init__(
        self,
        input_dim: int = 768,
        hidden_dim: int = 3072,
        output_dim: int = 768,
        num_hidden_layers: int = 2,
        activation: str = "gelu",
        dropout: float = 0.5,
        normalize_input: bool = False,
    ):
        super().__init__()
        # (a bool is an int in Python: `True` as a width would build a 1-wide layer)
        for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("output_dim", output_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not isinstance(num_hidden_layers, int) or isinstance(num_hidden_layers, bool) or num_hidden_layers < 1:
            raise ValueError(f"`num_hidden_layers` must be an integer >= 1, got {num_hidden_layers!r}.")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"`dropout` must be a number in [0, 1), got {dropout!r}.")
        if activation not in ACT2CLS:
            raise ValueError(f"`activation` must be one of {sorted(ACT2CLS)}, got {activation!r}.")

        widths = [input_dim] + [hidden_dim] * num_hidden_layers
        self.hidden_layers = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(num_hidden_layers))
        # (attribute names differ from the config keys `activation`/`dropout`, which ConfigMixin exposes)
        self.act_fn = get_activation(activation)
        self.hidden_dropout = nn.Dropout(dropout)
        self.output_layer = nn.Linear(hidden_dim, output_dim)

    def forward(self, image_embeds: torch.Tensor, return_dict: bool = True):
        """
        Args:
            image_embeds (`torch.Tensor` of shape `(batch_size, input_dim)`):
                CLIP embeddings in the joint space (image embeddings at inference; noisy projected text
                embeddings during LinCIR's language-only training).
            return_dict (`bool`, defaults to `True`):
                Return a [`TextualInversionProjectionOutput`] instead of a plain tuple.
        """
        if not torch.is_tensor(image_embeds) or image_embeds.ndim != 2 or image_embeds.shape[-1] != self.config.input_dim:
            got = tuple(image_embeds.shape) if torch.is_tensor(image_embeds) else type(image_embeds).__name__
            raise ValueError(
                f"`image_embeds` must be a tensor of shape (batch_size, {self.config.input_dim}), got {got}."
            )
        hidden_states = image_embeds.to(compute_dtype(self.output_layer))
        if self.config.normalize_input:
            hidden_states = F.normalize(hidden_states, dim=-1)
        for layer in self.hidden_layers:
            hidden_states = self.hidden_dropout(self.act_fn(layer(hidden_states)))
        pseudo_tokens = self.output_layer(hidden_states)

        if not return_dict:
            return (pseudo_tokens,)
        return TextualInversionProjectionOutput(pseudo_tokens=pseudo_tokens)


def encode_text_with_pseudo_tokens(
    text_encoder,
    input_ids: torch.Tensor,
    pseudo_tokens: torch.Tensor,
    placeholder_token_id: int = 259,
    output_hidden_states: bool = False,
):
    """Run a CLIP text tower (a transformers `CLIPTextModelWithProjection`) with the token embedding at every
    `placeholder_token_id` replaced by the prompt's pseudo token (the textual-inversion encoding of LinCIR, SEARLE
    and Pic2Word). `LinCIRPipeline` encodes its queries with it and the self-masking training loss its masked
    captions, so both see exactly the same encoding.

    The replacement is a forward hook on the token-embedding layer, removed when the call returns: the rest of
    the forward pass (position embeddings, causal attention in transformers' chosen implementation, final
    layer norm, end-of-text pooling, projection) is transformers' own. Not safe to call concurrently from
    several threads on one `text_encoder`.

    Returns `text_embeds` `(batch_size, projection_dim)`, or `(text_embeds, last_hidden_state)`.
    """
    embedding_layer = text_encoder.get_input_embeddings()
    is_placeholder = (input_ids == placeholder_token_id).unsqueeze(-1)

    def write_pseudo_tokens(module, args, token_embeds):
        return torch.where(is_placeholder, pseudo_tokens.unsqueeze(1).to(token_embeds.dtype), token_embeds)

    handle = embedding_layer.register_forward_hook(write_pseudo_tokens)
    try:
        outputs = text_encoder(input_ids=input_ids)
    finally:
        handle.remove()
    if output_hidden_states:
        return outputs.text_embeds, outputs.last_hidden_state
    return outputs.text_embeds
