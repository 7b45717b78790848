"""LinCIR (and SEARLE / Pic2Word) zero-shot composed image retrieval as a diffusers pipeline.

The query of a reference image and a modification text is encoded as

    CLIP vision tower -> phi -> pseudo token -> "a photo of $ that {text}" -> CLIP text tower + projection

The pseudo token replaces the token embedding at every position of the prompt that holds the placeholder
token (``$``, CLIP id 259); position embeddings, the causal mask and end-of-text pooling are those of the
unchanged CLIP text tower, and the projected pooled output is the query embedding, in the same joint space as
the gallery's CLIP image embeddings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging
from transformers import (
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ..checks import check_choice, check_positive_int
from ..models.textual_inversion_projection import TextualInversionProjection, encode_text_with_pseudo_tokens
from .auto import CIRPipelineMixin
from .inputs import check_float_pixels, check_tensor, check_tensor_data, warn_truncated
from .utils import check_image_paths, encode_pixel_batches, is_loadable_image

logger = logging.get_logger(__name__)

DEFAULT_PROMPT_TEMPLATE = "a photo of $ that {text}"

# FashionIQ captions end with stray punctuation ("is darker.", "has a logo?"); LinCIR strips these characters
# from both ends of each caption before joining the pair with " and ".
_FASHIONIQ_STRIP_CHARACTERS = ".?, "


@dataclass
class LinCIRPipelineOutput(BaseOutput):
    """Output of :class:`LinCIRPipeline`.

    Args:
        image_embeds (`torch.Tensor` or `np.ndarray` of shape `(batch_size, projection_dim)`):
            The composed query embeddings in the CLIP joint space (compare them with the gallery's CLIP image
            embeddings). L2-normalised when the pipeline is called with `normalize=True`.
        pseudo_tokens (`torch.Tensor` or `np.ndarray` of shape `(batch_size, hidden_size)`):
            The pseudo-word embedding written at the placeholder position of each query's prompt.
    """

    image_embeds: torch.Tensor | np.ndarray
    pseudo_tokens: torch.Tensor | np.ndarray


class LinCIRPipeline(CIRPipelineMixin, DiffusionPipeline):
    r"""
    Zero-shot composed image retrieval with a textual-inversion projection (LinCIR, SEARLE, Pic2Word).

    Args:
        phi ([`TextualInversionProjection`]):
            Maps CLIP image embeddings (width `projection_dim`) to pseudo-word embeddings (width `hidden_size`).
        text_encoder ([`~transformers.CLIPTextModelWithProjection`]):
            The frozen CLIP text tower with its projection.
        tokenizer ([`~transformers.CLIPTokenizer`]):
            The CLIP tokenizer; `placeholder_token` must be a single token of its vocabulary.
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`], *optional*):
            The CLIP vision tower; only needed to encode pixels (queries may pass `image_embeds` instead).
        image_processor ([`~transformers.CLIPImageProcessor`], *optional*):
            Pre-processing for `image_encoder`.
        prompt_template (`str`, defaults to `"a photo of $ that {text}"`):
            How a modification text becomes a prompt; `{text}` is replaced by the text. LinCIR's inference
            template is the default.
        placeholder_token (`str`, defaults to `"$"`):
            The token whose embedding is replaced by the pseudo token (LinCIR and SEARLE use `$`, CLIP id 259;
            Pic2Word uses `*`). Every occurrence in a prompt is replaced, as in the reference implementation.

    Example:
        >>> import torch
        >>> from transformers import CLIPTextConfig, CLIPTextModelWithProjection
        >>> from diffusers_cir.models.textual_inversion_projection import TextualInversionProjection
        >>> from diffusers_cir.pipelines.pipeline_lincir import LinCIRPipeline
        >>> from diffusers_cir.utils import build_offline_clip_tokenizer
        >>> _ = torch.manual_seed(0)
        >>> text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, projection_dim=24))
        >>> phi = TextualInversionProjection(input_dim=24, hidden_dim=96, output_dim=32)
        >>> pipe = LinCIRPipeline(phi=phi, text_encoder=text_encoder, tokenizer=build_offline_clip_tokenizer())
        >>> pipe.set_progress_bar_config(disable=True)
        >>> gallery = torch.randn(5, 24)  # CLIP image embeddings of the gallery (from `pipe.encode_image`)
        >>> query = pipe(image_embeds=gallery[:2], prompt=["is red", "has two dogs"], normalize=True)
        >>> query.image_embeds.shape
        torch.Size([2, 24])
        >>> (query.image_embeds @ torch.nn.functional.normalize(gallery, dim=-1).T).argmax(dim=-1).shape
        torch.Size([2])
    """

    model_cpu_offload_seq = "image_encoder->phi->text_encoder"
    _model_card_fields = {
        "tags": ["lincir", "textual-inversion"],
        "paper": "Language-only Efficient Training of Zero-shot Composed Image Retrieval (Gu et al., CVPR 2024), "
        "https://arxiv.org/abs/2312.01998",
        "description": "A `LinCIRPipeline`: a projection maps the CLIP image embedding of the reference to a pseudo "
        "word, which a prompt template places next to the modification text; the CLIP text embedding of that prompt "
        "is the query.",
    }
    _optional_components = ["image_encoder", "image_processor"]

    def __init__(
        self,
        phi: TextualInversionProjection,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        image_processor: CLIPImageProcessor | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        placeholder_token: str = "$",
    ):
        super().__init__()
        _check_prompt_template(prompt_template)
        self.register_modules(
            phi=phi,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            image_encoder=image_encoder,
            image_processor=image_processor,
        )
        self.register_to_config(prompt_template=prompt_template, placeholder_token=placeholder_token)
        if phi is not None and text_encoder is not None:
            if phi.config.output_dim != text_encoder.config.hidden_size:
                raise ValueError(
                    f"`phi` produces pseudo tokens of width {phi.config.output_dim} but the text encoder's token "
                    f"embeddings have width {text_encoder.config.hidden_size}."
                )
            if phi.config.input_dim != text_encoder.config.projection_dim:
                raise ValueError(
                    f"`phi` takes embeddings of width {phi.config.input_dim} but the CLIP joint space (the text "
                    f"encoder's projection_dim) has width {text_encoder.config.projection_dim}."
                )

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def embedding_dim(self) -> int:
        """Width of the CLIP joint space (the text tower's `projection_dim`), where queries and gallery live."""
        return self.text_encoder.config.projection_dim

    @property
    def placeholder_token_id(self) -> int:
        """Vocabulary id of `placeholder_token` (259 for `$` in CLIP's vocabulary)."""
        token = self.config.placeholder_token
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"`placeholder_token` {token!r} must be a single token of the tokenizer's vocabulary; it tokenises "
                f"to {len(ids)} tokens {ids}."
            )
        return int(ids[0])

    @torch.no_grad()
    def encode_image(
        self,
        images,
        batch_size: int = 64,
        device: torch.device | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """CLIP image embeddings `(N, projection_dim)` (projected, not normalised) of PIL images, image file paths
        or pixel values.

        Args:
            images: a PIL image or an image file path (`str` / `os.PathLike`, or an http(s) URL, read with
                `diffusers.utils.load_image` one batch at a time), a list of them, or preprocessed `pixel_values`
                of shape `(N, 3, H, W)`.
            batch_size (`int`, defaults to 64): images per forward pass of the vision tower.
            device (`torch.device`, *optional*): where to run (defaults to the pipeline's execution device).
            show_progress (`bool`, defaults to `False`): a progress bar over the batches (gallery encoding).
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        self._check_images(images, "images")
        check_tensor_data({"images": images})
        return self._encode_images(images, batch_size, device or self._execution_device, show_progress)

    def _encode_images(
        self, images, batch_size: int, device, show_progress: bool = False, name: str = "images"
    ) -> torch.Tensor:
        if torch.is_tensor(images):
            batches = list(images.split(batch_size))
        else:
            images = [images] if is_loadable_image(images) else list(images)
            batches = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
        batches = self.progress_bar(batches) if show_progress else batches
        return encode_pixel_batches(self.image_encoder, self.image_processor, batches, batch_size, device, name)

    def encode_prompt_with_pseudo_tokens(
        self,
        input_ids: torch.Tensor,
        pseudo_tokens: torch.Tensor,
        placeholder_token_id: int | None = None,
        output_hidden_states: bool = False,
    ):
        """Encode token ids with the pseudo tokens written at every placeholder position.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): tokenised prompts, each
                holding at least one `placeholder_token_id`.
            pseudo_tokens (`torch.Tensor` of shape `(batch_size, hidden_size)`): one pseudo token per prompt.
            placeholder_token_id (`int`, *optional*): defaults to the id of `placeholder_token`.
            output_hidden_states (`bool`): also return the final-layer-norm hidden states.

        Returns:
            `text_embeds` of shape `(batch_size, projection_dim)` (the projected end-of-text output), and with
            `output_hidden_states=True` the tuple `(text_embeds, last_hidden_state)`.

        Gradients flow to `pseudo_tokens` (language-only training backpropagates through the frozen tower).
        """
        if placeholder_token_id is None:
            placeholder_token_id = self.placeholder_token_id
        check_tensor(input_ids, "input_ids", ("batch_size", "sequence_length"))
        check_tensor(pseudo_tokens, "pseudo_tokens", (input_ids.shape[0], self.text_encoder.config.hidden_size))
        self._check_placeholders(input_ids, placeholder_token_id)
        return encode_text_with_pseudo_tokens(
            self.text_encoder, input_ids, pseudo_tokens, placeholder_token_id, output_hidden_states
        )

    def _check_placeholders(self, input_ids: torch.Tensor, placeholder_token_id: int) -> None:
        """Every prompt needs the placeholder, which only the token ids show (a template may put it where truncation
        cuts it off)."""
        missing = (~(input_ids == placeholder_token_id).any(dim=-1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"Prompts {missing} hold no placeholder token (id {placeholder_token_id}): every prompt needs "
                f"{self.config.placeholder_token!r} where the reference image goes (after truncation to "
                f"{input_ids.shape[1]} tokens)."
            )

    def _format_prompts(self, prompt, prompt_template: str) -> tuple[list[str], list[str | None]]:
        """Prompt strings for each query; the second list holds the reversed FashionIQ prompt (or None)."""
        forward, reversed_ = [], []
        for item in [prompt] if isinstance(prompt, str) else prompt:
            if isinstance(item, str):
                forward.append(prompt_template.format(text=item))
                reversed_.append(None)
            else:  # FashionIQ's two relative captions: both orders, joined with "and", averaged after encoding.
                first, second = (caption.strip(_FASHIONIQ_STRIP_CHARACTERS) for caption in item)
                forward.append(prompt_template.format(text=f"{first} and {second}"))
                reversed_.append(prompt_template.format(text=f"{second} and {first}"))
        return forward, reversed_

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        # Padded to the longest prompt of the call, not to 77: the text tower's attention is causal and it pools at
        # the first end-of-text token, so the padding after it changes nothing but the cost.
        tokens = self.tokenizer(
            prompts,
            padding="longest",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        warn_truncated(self.tokenizer, prompts, tokens.attention_mask.sum(dim=1).tolist(), logger)
        return tokens.input_ids

    # ------------------------------------------------------------------------------------------------- checks

    def check_inputs(
        self, image, prompt, image_embeds, pseudo_tokens, prompt_input_ids, prompt_template, batch_size, output_type
    ) -> None:
        """Check every argument once, before any file is read or tower runs; the steps of `__call__` trust what
        this lets through."""
        check_choice(output_type, "output_type", ("pt", "np"))
        check_positive_int(batch_size, "batch_size")
        given = [name for name, value in (("image", image), ("image_embeds", image_embeds), ("pseudo_tokens", pseudo_tokens)) if value is not None]
        if len(given) != 1:
            raise ValueError(
                f"Pass exactly one of `image`, `image_embeds`, `pseudo_tokens` (the reference), got {given or 'none'}."
            )
        if (prompt is None) == (prompt_input_ids is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_input_ids` (the modification text).")
        # values first: a meta tensor has a shape but nothing to read; NaN would make every output NaN
        check_tensor_data({"image": image, "image_embeds": image_embeds, "pseudo_tokens": pseudo_tokens,
                           "prompt_input_ids": prompt_input_ids})
        if prompt is not None:
            _check_prompt_template(prompt_template)
            num_prompts = _check_prompt(prompt)
        else:
            num_prompts = self._check_prompt_input_ids(prompt_input_ids)
        num_references = self._check_reference(image, image_embeds, pseudo_tokens)
        if num_references != num_prompts and 1 not in (num_references, num_prompts):
            raise ValueError(
                f"Got {num_references} references ({given[0]}) but {num_prompts} prompts: pass as many of each, "
                "or a single one of either."
            )

    def _check_images(self, images, name: str) -> None:
        if self.image_encoder is None:
            raise ValueError(
                "This pipeline has no `image_encoder`, so it cannot encode pixels: pass CLIP `image_embeds` "
                "instead, or load the pipeline with a CLIPVisionModelWithProjection."
            )
        if torch.is_tensor(images):
            config = self.image_encoder.config  # pixel values as the image processor makes them for this tower
            check_tensor(images, name, ("N", config.num_channels, config.image_size, config.image_size), rows_of="image")
            check_float_pixels(images, name)
            return
        items = [images] if is_loadable_image(images) else images
        if isinstance(items, (list, tuple)) and not items:
            raise ValueError(f"`{name}` is an empty list: pass at least one image.")
        if not isinstance(items, (list, tuple)) or not all(is_loadable_image(item) for item in items):
            kinds = sorted({type(i).__name__ for i in items}) if isinstance(items, (list, tuple)) else []
            raise TypeError(
                f"`{name}` must be a PIL image, an image file path, a list of them or a pixel tensor, got "
                f"{type(images).__name__}{f' of {kinds}' if kinds else ''}."
            )
        if self.image_processor is None:
            raise ValueError("This pipeline has no `image_processor`: pass preprocessed pixel values or `image_embeds`.")
        check_image_paths(images, name)

    def _check_reference(self, image, image_embeds, pseudo_tokens) -> int:
        """The number of references, whichever form they come in."""
        if image is not None:
            self._check_images(image, "image")
            if torch.is_tensor(image):
                return image.shape[0]
            return 1 if is_loadable_image(image) else len(image)
        if image_embeds is not None:
            shape = ("batch_size", self.phi.config.input_dim)
            return check_tensor(image_embeds, "image_embeds", shape, rows_of="reference embedding").shape[0]
        shape = ("batch_size", self.text_encoder.config.hidden_size)
        return check_tensor(pseudo_tokens, "pseudo_tokens", shape, rows_of="pseudo token").shape[0]

    def _check_prompt_input_ids(self, prompt_input_ids) -> int:
        check_tensor(prompt_input_ids, "prompt_input_ids", ("batch_size", "sequence_length"), rows_of="prompt")
        positions = self.text_encoder.config.max_position_embeddings
        if prompt_input_ids.shape[1] > positions:
            raise ValueError(
                f"`prompt_input_ids` holds {prompt_input_ids.shape[1]} tokens per prompt, more than the {positions} "
                f"positions of the text encoder: tokenise with truncation=True, max_length={positions}."
            )
        dtype = prompt_input_ids.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise ValueError(f"`prompt_input_ids` must hold integer token ids, got dtype {dtype}.")
        vocab_size = self.text_encoder.get_input_embeddings().num_embeddings
        outside = prompt_input_ids[(prompt_input_ids < 0) | (prompt_input_ids >= vocab_size)].unique().tolist()
        if outside:
            raise ValueError(
                f"`prompt_input_ids` holds ids outside the text encoder's vocabulary [0, {vocab_size}): {outside[:10]}."
            )
        return prompt_input_ids.shape[0]

    # ------------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | str | os.PathLike | list[PIL.Image.Image | str | os.PathLike] | None = None,
        prompt: str | list[str] | list[tuple[str, str]] | None = None,
        image_embeds: torch.Tensor | None = None,
        pseudo_tokens: torch.Tensor | None = None,
        prompt_input_ids: torch.Tensor | None = None,
        prompt_template: str | None = None,
        normalize: bool = False,
        batch_size: int = 256,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        r"""
        Encode composed queries (reference image + modification text) into the CLIP joint space.

        Args:
            image (`PIL.Image.Image`, an image file path, or a list of them, *optional*):
                Reference images (needs `image_encoder`); a path (`str` / `os.PathLike`, or an http(s) URL) is read
                with `diffusers.utils.load_image`. Exactly one of `image`, `image_embeds`,
                `pseudo_tokens` must be given.
            prompt (`str`, list of `str`, or list of `(str, str)` pairs):
                Modification texts, formatted with `prompt_template`. A pair of captions follows FashionIQ's
                convention: both orders (`"{a} and {b}"`, `"{b} and {a}"`) are encoded with the same pseudo
                token and the query is the mean of the two L2-normalised embeddings. Prompts longer than the text
                encoder's 77 tokens are cut there, with one warning per call saying how many were cut.
            image_embeds (`torch.Tensor` of shape `(batch_size, projection_dim)`, *optional*):
                Precomputed CLIP image embeddings of the reference images (as returned by `encode_image`).
            pseudo_tokens (`torch.Tensor` of shape `(batch_size, hidden_size)`, *optional*):
                Precomputed pseudo tokens (skips `phi`), e.g. from SEARLE's optimisation-based inversion.
            prompt_input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Already tokenised prompts holding the placeholder id, instead of `prompt`; at most the text encoder's
                77 positions long.
            prompt_template (`str`, *optional*):
                Overrides the pipeline's `prompt_template` for this call (must contain `{text}`).
            normalize (`bool`, defaults to `False`):
                L2-normalise the returned query embeddings.
            batch_size (`int`, defaults to 256):
                Queries per forward pass of phi and the text tower (a progress bar runs over the chunks).
            output_type (`str`, defaults to `"pt"`): `"pt"` or `"np"`.
            return_dict (`bool`, defaults to `True`): return a [`LinCIRPipelineOutput`] or a tuple.

        A single reference (or a single prompt) is broadcast against a batch of the other. Tensor arguments must be
        finite and hold data (not on the meta device); pixel values must have the vision tower's input size.

        Returns:
            [`LinCIRPipelineOutput`] or `(image_embeds, pseudo_tokens)`.
        """
        # 1. Check inputs
        prompt_template = self.config.prompt_template if prompt_template is None else prompt_template
        self.check_inputs(
            image, prompt, image_embeds, pseudo_tokens, prompt_input_ids, prompt_template, batch_size, output_type
        )
        device = self._execution_device
        text_dtype = self.text_encoder.dtype

        # 2. Prompts -> token ids (the reversed FashionIQ prompts are appended after the forward ones).
        if prompt is not None:
            forward_prompts, reversed_prompts = self._format_prompts(prompt, prompt_template)
            paired = [index for index, text in enumerate(reversed_prompts) if text is not None]
            input_ids = self._tokenize(forward_prompts + [reversed_prompts[index] for index in paired])
            num_prompts = len(forward_prompts)
        else:
            input_ids, paired, num_prompts = prompt_input_ids.long(), [], prompt_input_ids.shape[0]
        placeholder_token_id = self.placeholder_token_id
        self._check_placeholders(input_ids, placeholder_token_id)

        # 3. Reference -> pseudo tokens.
        if image is not None:
            image_embeds = self._encode_images(image, batch_size, device, name="image")
        if image_embeds is not None:
            phi_dtype = self.phi.dtype  # the compute dtype, also under layerwise casting
            pseudo_tokens = torch.cat(
                [self.phi(chunk.to(device=device, dtype=phi_dtype)).pseudo_tokens for chunk in image_embeds.split(batch_size)]
            )
        pseudo_tokens = pseudo_tokens.to(device=device, dtype=text_dtype)

        # 4. Broadcast a single reference or a single prompt against the other batch.
        num_references = pseudo_tokens.shape[0]
        if num_references != num_prompts:
            if num_references == 1:
                pseudo_tokens = pseudo_tokens.expand(num_prompts, -1)
            else:
                forward_ids = input_ids[:1].expand(num_references, -1)
                if paired:  # one FashionIQ pair for every reference: forward rows, then reversed rows
                    input_ids = torch.cat([forward_ids, input_ids[1:2].expand(num_references, -1)])
                    paired = list(range(num_references))
                else:
                    input_ids = forward_ids
                num_prompts = num_references
        batch_pseudo_tokens = torch.cat([pseudo_tokens, pseudo_tokens[paired]]) if paired else pseudo_tokens

        # 5. Encode the prompts with the pseudo tokens, chunk by chunk.
        input_ids = input_ids.to(device)
        chunks = []
        starts = range(0, input_ids.shape[0], batch_size)
        for start in self.progress_bar(starts) if len(starts) > 1 else starts:
            chunks.append(
                encode_text_with_pseudo_tokens(
                    self.text_encoder, input_ids[start : start + batch_size],
                    batch_pseudo_tokens[start : start + batch_size], placeholder_token_id,
                )
            )
        text_embeds = torch.cat(chunks)

        # 6. Average the FashionIQ orders, normalise, convert.
        query_embeds = text_embeds[:num_prompts]
        if paired:
            averaged = (F.normalize(query_embeds[paired], dim=-1) + F.normalize(text_embeds[num_prompts:], dim=-1)) / 2
            query_embeds = query_embeds.clone()
            query_embeds[paired] = averaged
        if normalize:
            query_embeds = F.normalize(query_embeds, dim=-1)

        self.maybe_free_model_hooks()
        if output_type == "np":
            query_embeds = query_embeds.float().cpu().numpy()
            pseudo_tokens = pseudo_tokens.float().cpu().numpy()
        if not return_dict:
            return (query_embeds, pseudo_tokens)
        return LinCIRPipelineOutput(image_embeds=query_embeds, pseudo_tokens=pseudo_tokens)


def _check_prompt(prompt) -> int:
    """The number of queries in `prompt`: a string, or a non-empty list of strings and FashionIQ caption pairs."""
    items = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(items, Sequence) or len(items) == 0:
        raise ValueError(f"`prompt` must be a string or a non-empty list, got {prompt!r}.")
    for index, item in enumerate(items):
        pair = isinstance(item, Sequence) and len(item) == 2 and all(isinstance(caption, str) for caption in item)
        if not (isinstance(item, str) or pair):
            raise ValueError(
                f"`prompt[{index}]` must be a string or a pair of strings (FashionIQ's two captions), got {item!r}."
            )
    return len(items)


def _check_prompt_template(prompt_template) -> None:
    """The template is filled with `str.format(text=...)`: it needs `{text}` and no other replacement field."""
    if not isinstance(prompt_template, str) or "{text}" not in prompt_template:
        raise ValueError(f"`prompt_template` must contain '{{text}}', got {prompt_template!r}.")
    try:
        prompt_template.format(text="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"`prompt_template` {prompt_template!r} is filled with str.format(text=...): '{{text}}' must be its only "
            f"replacement field (write other braces as '{{{{' and '}}}}'); formatting it failed with "
            f"{type(error).__name__}: {error}."
        ) from error
