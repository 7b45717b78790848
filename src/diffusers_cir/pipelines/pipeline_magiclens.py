# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""MagicLens (Zhang et al., ICML 2024) as a diffusers pipeline: image + instruction -> one retrieval embedding.

A query is a reference image and an instruction ("inside view of this building", "the same car in red"); a gallery
item is an image with the empty text. Both go through the same weights:

    pixels  -> CLIP vision tower + projection --\
                                                 +-> MagicLensFusion -> embedding (compared L2-normalised)
    text    -> CLIP text tower + projection   --/

The CLIP towers are transformers' own (``CLIPVisionModelWithProjection``, ``CLIPTextModelWithProjection``), run as
scenic's CLIP computes them: the text attention hides every token whose id is 0 (padding, and the real token "!"
that CLIP's vocabulary numbers 0) from every other token, on top of the causal mask, and a position that sees
nothing attends uniformly (flax replaces masked logits by the most negative float instead of -inf). Text is cleaned
and tokenised as OpenAI's ``SimpleTokenizer`` does (ftfy, HTML unescaped twice, whitespace collapsed, lower case,
CLIP's BPE), ids padded with 0. The authors' code refuses a text longer than the 77-token context; here it is cut to
76 tokens plus the end token, with a warning naming it.

Because the reference image's pixels go through the fusion together with the text, a query cannot be composed from
the reference's gallery embedding: ``__call__`` takes images (retrieval passes the reference images).
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from ..models.magiclens_fusion import MagicLensFusion
from ..retrieval.images import load_image
from .auto import CIRPipelineMixin
from .image_processing_magiclens import MagicLensImageProcessor
from .inputs import check_pixel_tensor
from .utils import check_image_paths, is_loadable_image, load_image_paths

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_cir import AutoCIRPipeline

        >>> pipe = AutoCIRPipeline.from_pretrained("magic_lens_clip_large.pkl")  # the release, converted on first use
        >>> gallery = pipe.encode_image(["shirt_1.jpg", "shirt_2.jpg", "dress.jpg"])  # [3, 768]
        >>> query = pipe(image="shirt_0.jpg", prompt="is red and has long sleeves").image_embeds  # [1, 768]
        >>> scores = torch.nn.functional.normalize(query, dim=-1) @ torch.nn.functional.normalize(gallery, dim=-1).T
        ```
"""

# FashionIQ's two captions of a query are joined as the authors join them (data_utils.py: " and ".join(captions)).
CAPTION_JOINER = " and "


@dataclass
class MagicLensPipelineOutput(BaseOutput):
    """Output of :class:`MagicLensPipeline`.

    Args:
        image_embeds (`torch.Tensor` or `np.ndarray` of shape `(batch_size, embed_dim)`):
            The query embeddings, in the space of `encode_image`'s gallery embeddings. L2-normalised when the pipeline
            is called with `normalize=True` (MagicLens compares normalised embeddings by dot product).
    """

    image_embeds: torch.Tensor | np.ndarray


def clean_text(text: str) -> str:
    """OpenAI CLIP's text cleaning (scenic's tokenizer): ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
    try:
        import ftfy
    except ImportError as error:  # pragma: no cover - ftfy is a dependency of the magiclens extra
        raise ImportError(
            "MagicLens cleans text with ftfy, as the authors' tokenizer does: `pip install 'diffusers-cir[magiclens]'`."
        ) from error
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def normalize_embeddings(embeds: torch.Tensor) -> torch.Tensor:
    """MagicLens's normalisation, ``e / sqrt(sum(e**2) + 1e-12)`` in float32, back in ``embeds``' dtype."""
    values = embeds.float()
    return (values / torch.sqrt(values.square().sum(dim=-1, keepdim=True) + 1e-12)).to(embeds.dtype)


def _same_device(requested: torch.device, actual: torch.device) -> bool:
    return requested.type == actual.type and requested.index in (None, actual.index if actual.index is not None else 0)


def text_attention_mask(input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scenic's CLIP text mask as an additive ``[B, 1, L, L]`` mask: key k is visible from query q when k <= q and both
    ids are non-zero. Hidden logits get half the most negative float of ``dtype``: not -inf, so that a query that sees
    nothing attends uniformly, as in flax (which replaces its logits by the most negative float); and not the most
    negative float itself, which a negative logit added in float16 would turn into -inf (NaN for a blind row)."""
    length = input_ids.shape[1]
    valid = input_ids > 0
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    visible = causal[None] & valid[:, :, None] & valid[:, None, :]
    mask = torch.zeros(visible.shape, dtype=dtype, device=input_ids.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min / 2)[:, None]


class MagicLensPipeline(CIRPipelineMixin, DiffusionPipeline):
    r"""
    Composed image retrieval with MagicLens: one embedding for (image, instruction) queries and (image, "") gallery
    items, from the same weights.

    Args:
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`]):
            The CLIP vision tower (ViT-B/16 for MagicLens-B, ViT-L/14 for MagicLens-L) with its projection.
        text_encoder ([`~transformers.CLIPTextModelWithProjection`]):
            The CLIP text tower with its projection.
        tokenizer ([`~transformers.CLIPTokenizer`]):
            CLIP's BPE tokenizer (see `diffusers_cir.utils.build_offline_clip_tokenizer`).
        fusion ([`MagicLensFusion`]):
            The multimodal layers and attention pooler.
        image_processor ([`MagicLensImageProcessor`]):
            The authors' preprocessing (divide by the image's maximum, squash to 224, crop, resize, normalise).

    Example:
        >>> import torch
        >>> from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig
        >>> from transformers import CLIPVisionModelWithProjection
        >>> from diffusers_cir import MagicLensFusion, MagicLensImageProcessor, MagicLensPipeline
        >>> from diffusers_cir.utils import build_offline_clip_tokenizer
        >>> _ = torch.manual_seed(0)
        >>> pipe = MagicLensPipeline(
        ...     image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64,
        ...         num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16, projection_dim=16)),
        ...     text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, intermediate_size=32,
        ...         num_hidden_layers=1, num_attention_heads=2, projection_dim=16)),
        ...     tokenizer=build_offline_clip_tokenizer(),
        ...     fusion=MagicLensFusion(embed_dim=16, num_layers=1, num_attention_heads=2, ff_dim=32,
        ...         pooler_num_attention_heads=2),
        ...     image_processor=MagicLensImageProcessor(image_size=32))
        >>> from PIL import Image
        >>> pipe(image=Image.new("RGB", (40, 30), "red"), prompt="make it blue").image_embeds.shape
        torch.Size([1, 16])
    """

    model_cpu_offload_seq = "image_encoder->text_encoder->fusion"
    _model_card_fields = {
        "tags": ["magiclens"],
        "paper": "MagicLens: Self-Supervised Image Retrieval with Open-Ended Instructions (Zhang et al., ICML 2024), "
        "https://arxiv.org/abs/2403.19651",
        "description": "A `MagicLensPipeline`: CLIP's image and text embeddings of a reference image and an instruction, "
        "fused by self-attention layers and an attention pooler into one embedding; gallery images are embedded with "
        "the empty text by the same weights, and queries and gallery are compared by the dot product of the "
        "normalised embeddings.",
    }
    _gallery_components = ("image_encoder", "image_processor", "text_encoder", "fusion")

    def __init__(
        self,
        image_encoder: CLIPVisionModelWithProjection,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        fusion: MagicLensFusion,
        image_processor: MagicLensImageProcessor,
    ):
        super().__init__()
        self.register_modules(
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            fusion=fusion,
            image_processor=image_processor,
        )
        _check_components(image_encoder, text_encoder, fusion, image_processor)

    # ------------------------------------------------------------------------------------------------ encoders

    @property
    def embedding_dim(self) -> int:
        """Width of the MagicLens embedding (512 for MagicLens-B, 768 for MagicLens-L)."""
        return self.fusion.config.embed_dim

    @property
    def context_length(self) -> int:
        """Tokens the text tower reads (77)."""
        return self.text_encoder.config.max_position_embeddings

    def tokenize(self, texts: list[str], pad_to: int | None = None, warn: bool = True) -> torch.Tensor:
        """Token ids ``[B, L]`` of cleaned ``texts``, start and end tokens included, padded with 0 to the longest text
        (or to ``pad_to``). A text longer than the context keeps its first tokens and the end token, reported in one
        warning (``warn``): the authors' code refuses it."""
        encoded = self.tokenizer([clean_text(text) for text in texts], add_special_tokens=True, verbose=False)["input_ids"]
        limit = self.context_length
        if warn:
            self._warn_cut(texts, [len(ids) for ids in encoded])
        length = max(pad_to or 0, max(min(len(ids), limit) for ids in encoded))
        input_ids = torch.zeros(len(encoded), length, dtype=torch.long)
        for row, ids in enumerate(encoded):
            if len(ids) > limit:
                ids = ids[: limit - 1] + ids[-1:]
            input_ids[row, : len(ids)] = torch.tensor(ids)
        return input_ids

    def _warn_cut(self, texts: list[str], lengths: list[int] | None = None) -> None:
        """One warning for all of ``texts`` that the text tower cannot read whole."""
        if lengths is None:
            cleaned = [clean_text(text) for text in texts]
            lengths = [len(ids) for ids in self.tokenizer(cleaned, add_special_tokens=True, verbose=False)["input_ids"]]
        limit = self.context_length
        cut = [length for length in lengths if length > limit]
        if cut:
            one = len(cut) == 1
            logger.warning(
                f"{len(cut)} of the {len(texts)} prompts of this call {'is' if one else 'are'} longer than the {limit} "
                f"tokens MagicLens's text tower reads (start and end tokens included) and {'was' if one else 'were'} "
                f"cut to the first {limit - 1} tokens and the end token (the longest had {max(cut)}): the words after "
                "the cut do not count (the authors' code refuses such texts). Shorten them."
            )

    def encode_text(self, input_ids: torch.Tensor, output_hidden_states: bool = False):
        """Projected CLIP text embeddings ``[B, D]`` of token ids (scenic's id-0 mask; not normalised). With
        ``output_hidden_states=True``, also the text tower's output after its final LayerNorm ``[B, L, width]``."""
        dtype = self.text_encoder.dtype
        input_ids = input_ids.to(self._execution_device)
        outputs = self.text_encoder(input_ids=input_ids, attention_mask=text_attention_mask(input_ids, dtype))
        if output_hidden_states:
            return outputs.text_embeds, outputs.last_hidden_state
        return outputs.text_embeds

    def encode_pixels(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        """Projected CLIP image embeddings ``[B, D]`` of preprocessed pixel values (not normalised). With
        ``output_hidden_states=True``, also the vision tower's tokens before its final LayerNorm."""
        pixel_values = pixel_values.to(device=self._execution_device, dtype=self.image_encoder.dtype)
        outputs = self.image_encoder(pixel_values=pixel_values)
        if output_hidden_states:
            return outputs.image_embeds, outputs.last_hidden_state
        return outputs.image_embeds

    def fuse(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """The MagicLens embedding ``[B, D]`` (not normalised) of CLIP image and text embeddings."""
        device, dtype = self._execution_device, self.fusion.dtype
        return self.fusion(image_embeds.to(device=device, dtype=dtype), text_embeds.to(device=device, dtype=dtype)).embeds

    def _pixel_batches(self, images, batch_size: int, name: str):
        """``images`` (one or a list of PIL images / paths / bytes / image dicts, or a pixel tensor) as a list of
        pixel-value batches, each read only when it is processed."""
        if torch.is_tensor(images):
            # NaN pixels or a meta tensor would give NaN embeddings or a crash inside the tower.
            check_pixel_tensor(images, name, self.image_encoder.config.image_size)
            return [lambda chunk=chunk: chunk for chunk in images.split(batch_size)]
        items = [images] if is_loadable_image(images) or isinstance(images, np.ndarray) else images
        if not isinstance(items, Sequence) or isinstance(items, str) or not items:
            raise ValueError(
                f"`{name}` must be an image (PIL image, file path, encoded bytes), a non-empty list of them or pixel "
                f"values, got {type(images).__name__}."
            )
        bad = [index for index, item in enumerate(items) if not (is_loadable_image(item) or isinstance(item, np.ndarray))]
        if bad:
            raise ValueError(f"`{name}[{bad[0]}]` is a {type(items[bad[0]]).__name__}, not an image.")
        check_image_paths(items, name)

        def load(start: int):
            batch = load_image_paths(list(items[start : start + batch_size]), name, offset=start)
            # Arrays go through load_image too: wide, float (range-scaled) and NaN pixels are its to handle.
            batch = [load_image(item, name=f"{name}[{start + index}]") if isinstance(item, np.ndarray) else item
                     for index, item in enumerate(batch)]
            return self.image_processor(batch).pixel_values

        return [lambda start=start: load(start) for start in range(0, len(items), batch_size)]

    @torch.no_grad()
    def encode_image(
        self,
        images,
        batch_size: int = 64,
        device: torch.device | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Gallery embeddings ``(N, embed_dim)`` (not normalised): each image fused with the empty text, as the authors
        embed their index.

        Args:
            images: a PIL image, an image file path (`str` / `os.PathLike`, or an http(s) URL), encoded bytes, a
                `datasets` image dict, a list of them (read with `diffusers_cir.load_image` one batch at a time), or
                preprocessed `pixel_values` of shape `(N, 3, H, W)`.
            batch_size (`int`, defaults to 64): images per forward pass.
            device (`torch.device`, *optional*): where to run (defaults to the pipeline's execution device).
            show_progress (`bool`, defaults to `False`): a progress bar over the batches (gallery encoding).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if device is not None and not _same_device(torch.device(device), self._execution_device):
            raise ValueError(
                f"`device` is {device!r} but the pipeline runs on {self._execution_device}: move it with "
                "`pipe.to(device)` first."
            )
        batches = self._pixel_batches(images, batch_size, "images")
        empty_text = self.encode_text(self.tokenize([""]))  # the same for every gallery item
        embeds = []
        for load in self.progress_bar(batches) if show_progress else batches:
            image_embeds = self.encode_pixels(load())
            embeds.append(self.fuse(image_embeds, empty_text.expand(image_embeds.shape[0], -1)))
        return torch.cat(embeds)

    # ------------------------------------------------------------------------------------------------- call

    def check_inputs(self, image, prompt, batch_size: int, output_type: str) -> list[str]:
        """Check a call's arguments; returns the prompts as a list of strings (caption pairs joined)."""
        if image is None:
            raise ValueError(
                "`image` is required: MagicLens fuses the reference image's pixels with the text, so a query needs "
                "the image itself (a gallery embedding cannot stand for it)."
            )
        if isinstance(image, (list, tuple)) and not image:
            raise ValueError("`image` is an empty list: pass at least one reference image.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if output_type not in ("pt", "np"):
            raise ValueError(f"`output_type` must be 'pt' or 'np', got {output_type!r}.")
        items = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(
                f"`prompt` must be a string or a non-empty list of strings (or of caption pairs), got {prompt!r}."
            )
        prompts = []
        for index, item in enumerate(items):
            if isinstance(item, str):
                prompts.append(item)
            elif isinstance(item, (list, tuple)) and item and all(isinstance(caption, str) for caption in item):
                prompts.append(CAPTION_JOINER.join(item))
            else:
                raise ValueError(
                    f"`prompt[{index}]` must be a string or a list of captions (FashionIQ's pair), got {item!r}."
                )
        return prompts

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PIL.Image.Image | str | os.PathLike | list | torch.Tensor | None = None,
        prompt: str | list[str] | list[tuple[str, str]] | None = None,
        normalize: bool = False,
        batch_size: int = 64,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        r"""
        Embed composed queries: reference images with instructions.

        Args:
            image (`PIL.Image.Image`, an image file path, encoded bytes, a list of them, or a pixel tensor):
                The reference images (read with `diffusers_cir.load_image`; a tensor is preprocessed pixel values).
            prompt (`str`, list of `str`, or list of caption lists):
                The instructions. A list of captions is joined with `" and "`, as the authors do for FashionIQ's
                two captions. The empty string gives the gallery embedding of the image.
            normalize (`bool`, defaults to `False`): L2-normalise the embeddings.
            batch_size (`int`, defaults to 64): queries per forward pass (a progress bar runs over the batches).
            output_type (`str`, defaults to `"pt"`): `"pt"` or `"np"`.
            return_dict (`bool`, defaults to `True`): return a [`MagicLensPipelineOutput`] or a tuple.

        A single reference (or a single prompt) is broadcast against a batch of the other.

        Examples:

        Returns:
            [`MagicLensPipelineOutput`] or `(image_embeds,)`.
        """
        # 1. Check inputs
        prompts = self.check_inputs(image, prompt, batch_size, output_type)

        # 2. Pair references with prompts (a single one of either is broadcast)
        image_batches = self._pixel_batches(image, batch_size, "image")
        num_images = image.shape[0] if torch.is_tensor(image) else (len(image) if isinstance(image, (list, tuple)) else 1)
        if num_images != len(prompts) and 1 not in (num_images, len(prompts)):
            raise ValueError(
                f"Got {num_images} reference images but {len(prompts)} prompts: pass as many of each, or a single one "
                "of either."
            )

        # 3. Encode the references (texts the tower cannot read whole are reported once, not per batch)
        self._warn_cut(prompts)
        image_embeds = torch.cat([self.encode_pixels(load()) for load in image_batches])
        if num_images == 1:
            image_embeds = image_embeds.expand(len(prompts), -1)

        # 4. Encode the prompts and fuse, batch by batch
        starts = range(0, image_embeds.shape[0], batch_size)
        embeds = []
        for start in self.progress_bar(starts) if len(starts) > 1 else starts:
            chunk = image_embeds[start : start + batch_size]
            texts = prompts[start : start + batch_size] if len(prompts) > 1 else prompts * chunk.shape[0]
            embeds.append(self.fuse(chunk, self.encode_text(self.tokenize(texts, warn=False))))
        query_embeds = torch.cat(embeds)

        # 5. Normalise and convert
        if normalize:
            query_embeds = normalize_embeddings(query_embeds)
        self.maybe_free_model_hooks()
        if output_type == "np":
            query_embeds = query_embeds.float().cpu().numpy()
        if not return_dict:
            return (query_embeds,)
        return MagicLensPipelineOutput(image_embeds=query_embeds)


def _check_components(image_encoder, text_encoder, fusion, image_processor) -> None:
    """The towers, the fusion and the preprocessing must agree on widths and resolution."""
    if None in (image_encoder, text_encoder, fusion):
        return  # a partial load; the pipeline refuses work when it runs
    widths = {
        "image_encoder.config.projection_dim": image_encoder.config.projection_dim,
        "text_encoder.config.projection_dim": text_encoder.config.projection_dim,
        "fusion.config.embed_dim": fusion.config.embed_dim,
    }
    if len(set(widths.values())) != 1:
        raise ValueError(f"The MagicLens components disagree on the embedding width: {widths}.")
    if image_processor is not None and image_processor.image_size != image_encoder.config.image_size:
        raise ValueError(
            f"The image processor makes {image_processor.image_size}-pixel inputs but the vision tower takes "
            f"{image_encoder.config.image_size}: set `image_size` of the MagicLensImageProcessor to match."
        )
