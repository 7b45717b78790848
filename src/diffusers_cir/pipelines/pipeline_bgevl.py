# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""BGE-VL (MegaPairs' "MMRet-CLIP", BAAI/BGE-VL-base and BAAI/BGE-VL-large) as a diffusers pipeline.

BGE-VL is a CLIP model fine-tuned on MegaPairs so that one CLIP space holds images, texts and their compositions:

    query   = normalise(text_projection(pooled text) + visual_projection(pooled image))   (both raw, summed once)
    gallery = visual_projection(pooled image)                                               (retrieval normalises)

Text-only and image-only queries are the normalised text or image feature. The towers are transformers' own
``CLIPTextModelWithProjection`` and ``CLIPVisionModelWithProjection`` (the released repos are plain CLIP checkpoints;
:mod:`diffusers_cir.conversion.bgevl` splits them without remote code), and the pixels go through transformers' PIL
CLIP image processor, which reproduces the authors' preprocessing bit for bit (the torchvision one does not).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from ..checks import check_choice, check_finite_tensors, check_int, check_positive_int, check_texts
from ..retrieval.images import pixel_values
from .auto import CIRPipelineMixin
from .inputs import check_not_both, check_pixel_tensor, check_tensor
from .utils import check_image_paths, encode_pixel_batches, load_image_paths, loadable_image_list

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_cir import AutoCIRPipeline

        >>> pipe = AutoCIRPipeline.from_pretrained("BGE-VL-large")  # the released folder, split into towers once
        >>> gallery = pipe.encode_image(["cat.jpg", "dog.jpg", "car.jpg"])  # [3, 768], raw image features
        >>> query = pipe(image="reference.jpg", prompt="the same scene at night").image_embeds  # [1, 768], normalised
        >>> scores = query @ torch.nn.functional.normalize(gallery, dim=-1).T
        ```
"""


@dataclass
class BGEVLPipelineOutput(BaseOutput):
    """
    Output of :class:`BGEVLPipeline`.

    Args:
        image_embeds (`torch.Tensor` or `np.ndarray` of shape `(batch_size, projection_dim)`):
            The queries, L2-normalised, in float32: `normalise(text_feature + image_feature)` for a composed query,
            the normalised text or image feature for a text-only or image-only one.
    """

    image_embeds: torch.Tensor | np.ndarray


class BGEVLPipeline(CIRPipelineMixin, DiffusionPipeline):
    r"""
    Composed image retrieval with BGE-VL (CLIP sizes): the sum of CLIP's projected text and image features.

    Args:
        text_encoder ([`~transformers.CLIPTextModelWithProjection`]):
            The text tower with its projection (`text_projection`, no bias).
        tokenizer ([`~transformers.CLIPTokenizer`]):
            CLIP's byte-level BPE tokenizer; its `model_max_length` (77) is the default truncation.
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`]):
            The vision tower with its projection (`visual_projection`, no bias); also embeds the gallery.
        image_processor ([`~transformers.CLIPImageProcessorPil`]):
            CLIP preprocessing (bicubic resize of the short side, centre crop, CLIP mean/std). The PIL backend matches
            the authors' numbers exactly; any CLIP image processor works.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder"
    _model_card_fields = {
        "tags": ["bge-vl", "megapairs", "clip"],
        "paper": "MegaPairs: Massive Data Synthesis For Universal Multimodal Retrieval (Zhou et al., ACL 2025), "
        "https://arxiv.org/abs/2412.14475",
        "description": "A `BGEVLPipeline`: BGE-VL, a CLIP model trained on MegaPairs. A composed query is the "
        "L2-normalised sum of the raw projected text feature and the raw projected image feature of the reference; "
        "the gallery side is the image feature (text-only and image-only queries work too).",
    }

    def __init__(
        self,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        image_encoder: CLIPVisionModelWithProjection,
        image_processor,
    ):
        super().__init__()
        self.register_modules(
            text_encoder=text_encoder, tokenizer=tokenizer, image_encoder=image_encoder, image_processor=image_processor
        )
        if text_encoder is not None and image_encoder is not None:
            text_dim, image_dim = text_encoder.config.projection_dim, image_encoder.config.projection_dim
            if text_dim != image_dim:
                raise ValueError(
                    f"The text tower projects to {text_dim} dimensions but the image tower to {image_dim}: BGE-VL adds "
                    "the two features, so both must come from one CLIP checkpoint."
                )

    # ------------------------------------------------------------------------------------------------ properties

    @property
    def embedding_dim(self) -> int:
        """Width of the joint space (CLIP's `projection_dim`), where queries and gallery live."""
        return self.image_encoder.config.projection_dim

    @property
    def max_sequence_length(self) -> int:
        """The longest prompt the text tower takes, in tokens (start and end tokens included)."""
        return min(int(self.tokenizer.model_max_length), self.text_encoder.config.max_position_embeddings)

    # ------------------------------------------------------------------------------------------------ images

    def preprocess_image(self, images) -> torch.Tensor:
        """Pixel values `(N, 3, H, W)` of PIL images, file paths, URLs, encoded bytes or `datasets` image dicts (read
        with :func:`diffusers_cir.load_image`: EXIF orientation applied, converted to RGB), as `encode_image` feeds
        them to the vision tower."""
        return pixel_values(self.image_processor, load_image_paths(list(images), "images"))

    @torch.no_grad()
    def encode_image(
        self,
        images,
        batch_size: int = 64,
        device: torch.device | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Image features `(N, projection_dim)`: projected, not normalised (BGE-VL's `encode_image` is their
        normalisation), in the vision tower's dtype.

        Args:
            images: a PIL image, an image file path or URL, encoded bytes, a `datasets` image dict, a list of them, or
                preprocessed pixel values `(N, 3, H, W)`.
            batch_size (`int`, defaults to 64): images per forward pass.
            device (`torch.device`, *optional*): where to run (defaults to the pipeline's execution device).
            show_progress (`bool`, defaults to `False`): a progress bar over the batches (gallery encoding).
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        batches = self._image_batches(images, "images", batch_size)
        return self._encode_image_batches(batches, batch_size, device or self._execution_device, show_progress)

    def _image_batches(self, images, name: str, batch_size: int) -> list:
        """`images` checked and cut into batches of at most `batch_size` (pixel tensors or lists of loadable items)."""
        if torch.is_tensor(images):
            check_pixel_tensor(images, name, self.image_encoder.config.image_size)
            return list(images.split(batch_size))
        items = loadable_image_list(images, name)
        check_image_paths(items, name)
        return [list(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]

    def _encode_image_batches(self, batches: list, batch_size: int, device, show_progress: bool) -> torch.Tensor:
        batches = self.progress_bar(batches) if show_progress else batches
        return encode_pixel_batches(self.image_encoder, self.image_processor, batches, batch_size, device, "images")

    # ------------------------------------------------------------------------------------------------ text

    def tokenize_prompt(self, prompt: str | list[str], max_sequence_length: int | None = None):
        """Token ids and attention mask of `prompt`, padded to the longest and truncated to `max_sequence_length`
        tokens (default: the tokenizer's `model_max_length`, 77), with a warning naming every truncated prompt.

        The authors' benchmark code truncates composed-query texts at 75 tokens; their one-call API does not truncate
        (and fails on a text longer than 77 tokens).
        """
        prompts = check_texts(prompt, "prompt")
        max_length = self._check_max_sequence_length(max_sequence_length)
        # verbose=False: the tokenizer's own "longer than the maximum" message is replaced by the one below
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        truncated = [index for index, length in enumerate(lengths) if length > max_length]
        if truncated:
            shown = ", ".join(f"prompt {index} ({lengths[index]} tokens)" for index in truncated[:5])
            more = f" and {len(truncated) - 5} more" if len(truncated) > 5 else ""
            logger.warning(
                f"{len(truncated)} of {len(prompts)} prompts are longer than {max_length} tokens and were truncated "
                f"(their end is not seen by the text tower): {shown}{more}."
            )
        return self.tokenizer(prompts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")

    def _check_max_sequence_length(self, max_sequence_length) -> int:
        limit = self.max_sequence_length
        if max_sequence_length is None:
            return limit
        # a start and an end token at least; the position table bounds the rest
        return check_int(max_sequence_length, "max_sequence_length", minimum=2, maximum=limit)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str],
        max_sequence_length: int | None = None,
        batch_size: int = 64,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Text features `(N, projection_dim)`: the projected pooled text output, not normalised, in the text tower's
        dtype. Tokenised as in :meth:`tokenize_prompt`."""
        batch_size = check_positive_int(batch_size, "batch_size")
        tokens = self.tokenize_prompt(prompt, max_sequence_length)
        return self._encode_tokens(tokens, batch_size, device or self._execution_device)

    def _encode_tokens(self, tokens, batch_size: int, device) -> torch.Tensor:
        features = []
        for start in range(0, tokens.input_ids.shape[0], batch_size):
            input_ids = tokens.input_ids[start : start + batch_size].to(device)
            attention_mask = tokens.attention_mask[start : start + batch_size].to(device)
            features.append(self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).text_embeds)
        return torch.cat(features)

    # ------------------------------------------------------------------------------------------------ call

    def check_inputs(self, image, prompt, image_embeds, max_sequence_length, batch_size, output_type):
        """Every argument of `__call__`, checked once; returns `(prompts or None, number of references or 0)`."""
        check_positive_int(batch_size, "batch_size")
        check_choice(output_type, "output_type", ("pt", "np"))
        check_not_both("image", image, "image_embeds", image_embeds, note=" (the reference)")
        if image is None and image_embeds is None and prompt is None:
            raise ValueError("Pass `image` (or `image_embeds`), `prompt`, or both: a query needs at least one of them.")
        prompts = None if prompt is None else check_texts(prompt, "prompt")
        self._check_max_sequence_length(max_sequence_length)
        num_references = 0
        if image_embeds is not None:  # the image features `encode_image` returns
            check_tensor(image_embeds, "image_embeds", ("batch_size", self.embedding_dim), rows_of="reference")
            check_finite_tensors({"image_embeds": image_embeds})
            num_references = image_embeds.shape[0]
        elif image is not None:
            num_references = sum(len(batch) for batch in self._image_batches(image, "image", batch_size))
        if prompts is not None and num_references and num_references != len(prompts) and 1 not in (num_references, len(prompts)):
            raise ValueError(
                f"Got {num_references} reference images but {len(prompts)} prompts: pass as many of each (image i goes "
                "with prompt i), or a single one of either."
            )
        return prompts, num_references

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PIL.Image.Image | str | os.PathLike | list | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        image_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        batch_size: int = 64,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        r"""
        Encode queries: a reference image with a modification text (composed), a text alone, or an image alone.

        Args:
            image (PIL image, image file path or URL, encoded bytes, `datasets` image dict, a list of them, or pixel
                values `(N, 3, H, W)`, *optional*):
                The reference images.
            prompt (`str` or `list[str]`, *optional*):
                The modification texts (image `i` goes with prompt `i`; a single one of either is broadcast).
            image_embeds (`torch.Tensor` of shape `(batch_size, projection_dim)`, *optional*):
                The references' image features as `encode_image` returns them (a gallery's cached embeddings), instead
                of `image`; the query is the same as from the pixels.
            max_sequence_length (`int`, *optional*):
                Truncate prompts to this many tokens (start and end tokens included; default 77, the tokenizer's
                `model_max_length`). The authors' benchmark code uses 75. A truncated prompt is reported in a warning.
            batch_size (`int`, defaults to 64): images or prompts per forward pass.
            output_type (`str`, defaults to `"pt"`): `"pt"` or `"np"`.
            return_dict (`bool`, defaults to `True`): return a [`BGEVLPipelineOutput`] or a tuple.

        Examples:

        Returns:
            [`BGEVLPipelineOutput`] or `(image_embeds,)`: L2-normalised queries in float32.
        """
        # 1. Check inputs
        prompts, num_references = self.check_inputs(image, prompt, image_embeds, max_sequence_length, batch_size, output_type)
        device = self._execution_device

        # 2. Image features of the references (raw, float32: the sum is formed in float32 whatever the tower dtype)
        if image is not None:
            batches = self._image_batches(image, "image", batch_size)
            image_embeds = self._encode_image_batches(batches, batch_size, device, show_progress=len(batches) > 1)
        image_features = None if image_embeds is None else image_embeds.to(device=device, dtype=torch.float32)

        # 3. Text features of the prompts (raw, float32)
        text_features = None
        if prompts is not None:
            tokens = self.tokenize_prompt(prompts, max_sequence_length)
            text_features = self._encode_tokens(tokens, batch_size, device).float()

        # 4. Compose: the raw features are added, then the sum is normalised once
        if text_features is None:
            query = image_features
        elif image_features is None:
            query = text_features
        else:
            query = text_features + image_features  # a single reference or prompt broadcasts against the other
        query = F.normalize(query, dim=-1)
        assert query.shape == (max(num_references, len(prompts or ())), self.embedding_dim)

        self.maybe_free_model_hooks()
        if output_type == "np":
            query = query.cpu().numpy()
        if not return_dict:
            return (query,)
        return BGEVLPipelineOutput(image_embeds=query)
