# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Composition-network ("fusion") pipelines: frozen image and text encoders plus a trained head that fuses them.

A query is ``fusion_head(image_feature(reference), text_feature(modification))``; the gallery is the image features
of the same frozen (or LoRA-merged) image tower. Members of the family differ in the head they were trained with and
how, not in how they run:

* :class:`Clip4CirPipeline`: CLIP4Cir's Combiner trained on triplets against target image features (Baldrati et al.);
* :class:`SCOTPipeline`: a Combiner trained zero-shot on text triplets, the modified caption's text feature as
  the target (Jawade et al., WACV 2025);
* :class:`MTSTPipeline`: a two-hop head trained with MTST's reverse modification texts and prototype alignment
  (Zhou et al., TMM 2025).

The encoders are transformers CLIP, open_clip CLIP or BLIP-2 Q-Former towers (see
:mod:`diffusers_cir.pipelines.composition_encoders`); ``examples/train_fusion.py`` trains any head on any of them.
A head over pooled features composes from the reference's gallery embedding (``image_embeds``) as well as from its
pixels: both are the same image feature.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging, replace_example_docstring

from ..checks import check_choice, check_positive_int, check_texts

# The component classes a saved folder's model_index.json can name must be imported (diffusers resolves them from
# sys.modules).
from ..models.clip4cir_combiner import Clip4CirCombiner  # noqa: F401
from ..models.open_clip_text import OpenCLIPTextEncoder  # noqa: F401
from ..models.open_clip_vision import OpenCLIPVisionEncoder  # noqa: F401
from ..models.two_hop_fusion import TwoHopFusionHead  # noqa: F401
from ..retrieval.image_processing_targetpad import TargetPadImageProcessor  # noqa: F401
from . import composition_encoders as encoders
from .auto import CIRPipelineMixin
from .inputs import (
    check_batch_sizes,
    check_float_pixels,
    check_not_both,
    check_tensor,
    check_tensor_data,
    warn_truncated,
)
from .utils import check_image_paths, encode_pixel_batches, loadable_image_list

logger = logging.get_logger(__name__)

__all__ = ["Clip4CirPipeline", "CompositionNetworkPipeline", "CompositionPipelineOutput", "MTSTPipeline", "SCOTPipeline"]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_cir import AutoCIRPipeline

        >>> pipe = AutoCIRPipeline.from_pretrained("clip4cir-fashioniq")  # a folder saved by examples/train_fusion.py
        >>> gallery = pipe.encode_image(["dress1.jpg", "dress2.jpg"])  # [2, D] image features
        >>> query = pipe(image="reference.jpg", prompt="is red with long sleeves").image_embeds  # [1, D], normalised
        >>> scores = query @ torch.nn.functional.normalize(gallery, dim=-1).T
        ```
"""


@dataclass
class CompositionPipelineOutput(BaseOutput):
    """Output of the composition-network pipelines.

    Args:
        image_embeds (`torch.Tensor` or `np.ndarray` of shape `(batch_size, feature_dim)`):
            The composed queries, L2-normalised, in the space of the gallery's image features.
        mixing_weight (`torch.Tensor` or `np.ndarray` of shape `(batch_size, 1)`):
            The head's weight of the text feature in its residual sum (CLIP4Cir's ``lambda``).
    """

    image_embeds: torch.Tensor | np.ndarray
    mixing_weight: torch.Tensor | np.ndarray


class CompositionNetworkPipeline(CIRPipelineMixin, DiffusionPipeline):
    r"""
    Composed image retrieval with frozen encoders and a trained fusion head (the family's shared base).

    Args:
        fusion_head ([`~diffusers_cir.models.Clip4CirCombiner`] or [`~diffusers_cir.models.TwoHopFusionHead`]):
            The trained head: `(image_features, text_features) -> composed_embeds` (L2-normalised).
        text_encoder ([`~transformers.CLIPTextModelWithProjection`], [`~diffusers_cir.models.OpenCLIPTextEncoder`] or
            [`~transformers.Blip2TextModelWithProjection`]):
            The text tower with its projection into the shared space.
        tokenizer: the text tower's tokenizer (CLIP's BPE for CLIP and open_clip towers, BERT's for BLIP-2).
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`], [`~diffusers_cir.models.OpenCLIPVisionEncoder`]
            or [`~transformers.Blip2VisionModelWithProjection`], *optional*):
            The image tower of the same model; it also embeds the gallery. Without it, queries pass `image_embeds`.
        image_processor (*optional*): the image tower's preprocessing (a transformers image processor; a
            [`TargetPadImageProcessor`] for CLIP4Cir's "target pad", which its authors use for queries and gallery).
    """

    _cir_abstract = True
    model_cpu_offload_seq = "text_encoder->image_encoder->fusion_head"
    _optional_components = ["image_encoder", "image_processor"]
    _model_card_fields = {"tags": ["composition-network"]}

    def __init__(self, fusion_head: ModelMixin, text_encoder, tokenizer, image_encoder=None, image_processor=None):
        super().__init__()
        self.register_modules(
            fusion_head=fusion_head, text_encoder=text_encoder, tokenizer=tokenizer, image_encoder=image_encoder,
            image_processor=image_processor,
        )
        if fusion_head is None or text_encoder is None:
            return  # diffusers builds pipelines with missing components while loading
        encoders.encoder_kind(text_encoder, image_encoder)
        widths = {"the text encoder's features": encoders.feature_dim(text_encoder)}
        if image_encoder is not None:
            widths["the image encoder's features"] = encoders.feature_dim(image_encoder)
        for what, width in widths.items():
            if width != fusion_head.config.feature_dim:
                raise ValueError(
                    f"The fusion head reads features of width {fusion_head.config.feature_dim} but {what} have width "
                    f"{width}: train the head on these encoders' features."
                )

    @property
    def embedding_dim(self) -> int:
        """Width of the shared space, where queries and gallery live."""
        return int(self.fusion_head.config.feature_dim)

    # ------------------------------------------------------------------------------------------------ images

    def _image_batches(self, images, name: str, batch_size: int) -> list:
        """`images` split into batches after every check that needs no pixels (a missing file fails at once)."""
        if self.image_encoder is None:
            raise ValueError(
                f"This pipeline has no `image_encoder`, so it cannot read `{name}` as pixels: pass the references' "
                "gallery embeddings as `image_embeds`, or load the pipeline with its image tower."
            )
        if torch.is_tensor(images):
            size = encoders.image_input_size(self.image_encoder)
            check_tensor(images, name, ("N", 3, size, size), rows_of="image")
            check_float_pixels(images, name)
            return list(images.split(batch_size))
        items = loadable_image_list(images, name)
        if self.image_processor is None:
            raise ValueError(f"This pipeline has no `image_processor`: pass `{name}` as pixel values or `image_embeds`.")
        check_image_paths(items, name)
        return [list(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]

    def _encode_image_batches(self, batches: list, batch_size: int, device, show_progress: bool, name: str):
        batches = self.progress_bar(batches) if show_progress else batches
        return encode_pixel_batches(
            self.image_encoder, self.image_processor, batches, batch_size, device, name, features=encoders.image_features
        )

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 64, device: torch.device | None = None, show_progress: bool = False):
        """Gallery embeddings `(N, feature_dim)`: the image tower's features (see
        :mod:`~diffusers_cir.pipelines.composition_encoders`), not normalised.

        Args:
            images: a PIL image, an image file path or URL, encoded bytes, a `datasets` image dict, a list of them, or
                pixel values `(N, 3, H, W)` as the image processor makes them.
            batch_size (`int`, defaults to 64): images per forward pass.
            device (`torch.device`, *optional*): where to run (defaults to the pipeline's execution device).
            show_progress (`bool`, defaults to `False`): a progress bar over the batches.
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        check_tensor_data({"images": images})
        batches = self._image_batches(images, "images", batch_size)
        return self._encode_image_batches(batches, batch_size, device or self._execution_device, show_progress, "images")

    # ------------------------------------------------------------------------------------------------ text

    def tokenize_prompt(self, prompt: str | list[str]) -> dict:
        """`input_ids` and `attention_mask` as the text tower reads them; one warning per call for texts it cuts."""
        prompts = check_texts(prompt, "prompt")
        tokens = encoders.tokenize_texts(self.tokenizer, self.text_encoder, prompts)
        if max(tokens["lengths"]) >= tokens["max_length"]:
            warn_truncated(self.tokenizer, prompts, tokens["lengths"], logger)
        return tokens

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], batch_size: int = 256, device: torch.device | None = None):
        """Text features `(N, feature_dim)` of the modification texts (what `prompt_embeds` takes)."""
        batch_size = check_positive_int(batch_size, "batch_size")
        tokens = self.tokenize_prompt(prompt)
        device = device or self._execution_device
        features = []
        for start in range(0, tokens["input_ids"].shape[0], batch_size):
            rows = slice(start, start + batch_size)
            features.append(encoders.text_features(
                self.text_encoder, tokens["input_ids"][rows].to(device), tokens["attention_mask"][rows].to(device)))
        return torch.cat(features)

    # ------------------------------------------------------------------------------------------------ call

    def check_inputs(self, image, prompt, image_embeds, prompt_embeds, batch_size, output_type) -> int:
        """Every argument of `__call__`, checked once before any file is read or tower runs; returns the number of
        queries."""
        check_positive_int(batch_size, "batch_size")
        check_choice(output_type, "output_type", ("pt", "np"))
        check_not_both("image", image, "image_embeds", image_embeds, note=" (the reference)")
        check_not_both("prompt", prompt, "prompt_embeds", prompt_embeds, note=" (the modification text)")
        if image is None and image_embeds is None:
            raise ValueError("Pass the reference: `image`, or its gallery embedding as `image_embeds`.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass the modification text: `prompt`, or its text features as `prompt_embeds`.")
        check_tensor_data({"image": image, "image_embeds": image_embeds, "prompt_embeds": prompt_embeds})
        width = self.embedding_dim
        sizes = {}
        if image_embeds is not None:
            sizes["image_embeds"] = check_tensor(image_embeds, "image_embeds", ("batch_size", width), rows_of="reference").shape[0]
        else:
            sizes["image"] = sum(len(batch) for batch in self._image_batches(image, "image", batch_size))
        if prompt_embeds is not None:
            sizes["prompt_embeds"] = check_tensor(prompt_embeds, "prompt_embeds", ("batch_size", width), rows_of="text").shape[0]
        else:
            sizes["prompt"] = len(check_texts(prompt, "prompt"))
        return check_batch_sizes(sizes)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PIL.Image.Image | str | os.PathLike | list | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        image_embeds: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        batch_size: int = 256,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        r"""
        Compose queries: each reference image fused with its modification text by the trained head.

        Args:
            image (PIL image, image file path or URL, encoded bytes, `datasets` image dict, a list of them, or pixel
                values `(N, 3, H, W)`, *optional*):
                The reference images (needs `image_encoder`). Exactly one of `image` and `image_embeds`.
            prompt (`str` or list of `str`, *optional*):
                The modification texts; a text longer than the text tower reads is cut there, with one warning per call.
                Exactly one of `prompt` and `prompt_embeds`.
            image_embeds (`torch.Tensor` of shape `(batch_size, feature_dim)`, *optional*):
                The references' gallery embeddings (from `encode_image`): the same image features, without the tower.
            prompt_embeds (`torch.Tensor` of shape `(batch_size, feature_dim)`, *optional*):
                The texts' features (from `encode_prompt`).
            batch_size (`int`, defaults to 256): queries per forward pass of the towers and the head.
            output_type (`str`, defaults to `"pt"`): `"pt"` or `"np"`.
            return_dict (`bool`, defaults to `True`): return a [`CompositionPipelineOutput`] or a tuple.

        A single reference (or a single text) is broadcast against a batch of the other.

        Examples:

        Returns:
            [`CompositionPipelineOutput`] or `(image_embeds, mixing_weight)`.
        """
        # 1. Check inputs
        num_queries = self.check_inputs(image, prompt, image_embeds, prompt_embeds, batch_size, output_type)
        device = self._execution_device

        # 2. Text features
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, batch_size=batch_size, device=device)

        # 3. Image features of the references
        if image_embeds is None:
            batches = self._image_batches(image, "image", batch_size)
            image_embeds = self._encode_image_batches(batches, batch_size, device, False, "image")

        # 4. Broadcast a single reference or text against the other batch
        image_embeds = image_embeds.to(device).expand(num_queries, -1)
        prompt_embeds = prompt_embeds.to(device).expand(num_queries, -1)

        # 5. Fuse, a batch at a time
        composed, mixing = [], []
        for start in range(0, num_queries, batch_size):
            rows = slice(start, start + batch_size)
            output = self.fusion_head(image_embeds[rows], prompt_embeds[rows])
            composed.append(output.composed_embeds)
            mixing.append(output.mixing_weight)
        query_embeds, mixing_weight = torch.cat(composed), torch.cat(mixing)

        # 6. Convert
        self.maybe_free_model_hooks()
        if output_type == "np":
            query_embeds, mixing_weight = query_embeds.float().cpu().numpy(), mixing_weight.float().cpu().numpy()
        if not return_dict:
            return (query_embeds, mixing_weight)
        return CompositionPipelineOutput(image_embeds=query_embeds, mixing_weight=mixing_weight)


class Clip4CirPipeline(CompositionNetworkPipeline):
    r"""
    CLIP4Cir: a Combiner over frozen (or task-adapted) CLIP features, trained contrastively on triplets against the
    target image's features. See [`CompositionNetworkPipeline`] for the components and the call.
    """

    _model_card_fields = {
        "tags": ["clip4cir", "combiner"],
        "paper": "Composed Image Retrieval using Contrastive Learning and Task-oriented CLIP-based Features (Baldrati "
        "et al., ACM TOMM 2023), https://arxiv.org/abs/2308.11485",
        "description": "A `Clip4CirPipeline`: CLIP4Cir's Combiner fuses the reference image's and the modification "
        "text's features (projections, concatenation, a learned mixing coefficient and a residual sum); the gallery "
        "is the image tower's features.",
    }


class SCOTPipeline(CompositionNetworkPipeline):
    r"""
    SCOT: a composition network trained zero-shot on text triplets (caption, modification, modified caption), the
    modified caption's text feature standing in for the target image. See [`CompositionNetworkPipeline`].
    """

    _model_card_fields = {
        "tags": ["scot", "zero-shot"],
        "paper": "SCOT: Self-Supervised Contrastive Pretraining For Zero-Shot Compositional Retrieval (Jawade et al., "
        "WACV 2025), https://arxiv.org/abs/2501.08347",
        "description": "A `SCOTPipeline`: a Combiner composition network over frozen encoders, trained on "
        "LLM-written text triplets with the modified caption's text embedding as the target; the gallery is the "
        "image tower's features.",
    }


class MTSTPipeline(CompositionNetworkPipeline):
    r"""
    MTST's fine-tuning: a two-hop head (image and text to an implicit prototype, prototype and text to the query),
    trained with reverse modification texts and prototype alignment. See [`CompositionNetworkPipeline`].
    """

    _model_card_fields = {
        "tags": ["mtst", "two-hop"],
        "paper": "Scale Up Composed Image Retrieval Learning via Modification Text Generation (Zhou et al., IEEE TMM "
        "2025), https://arxiv.org/abs/2504.05316",
        "description": "An `MTSTPipeline`: a two-hop fusion head (prototypical two-hop alignment) over frozen "
        "encoders; the gallery is the image tower's features.",
    }
