# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Training-free composed image retrieval: caption the reference, let a chat LLM rewrite the caption with the
modification, search with CLIP text features of the rewrite (CIReVL, LDRE).

    reference image -> captioner (BLIP-2 or any transformers VLM) -> caption(s)    [cached on disk per image]
    caption(s) + modification text -> chat LLM (any transformers causal LM with a chat template) -> rewrite(s)
    rewrite(s) -> CLIP text tower -> mean over the rewrites -> query, against CLIP image embeddings of the gallery

Captions and rewrites are generated with ``generate()`` in batches. The recipes (prompts, decoding, how many captions
and rewrites, how answers are read) are data in :mod:`~diffusers_cir.pipelines.caption_rewrite_recipes`, whose
docstring lists what was taken from the authors' code, what was not verified, and the published numbers (CLIP-G:
CIReVL 26.8 / 34.7 / 32.2, LDRE 31.1 / 36.2 / 32.5 for CIRCO mAP@5 / CIRR R@1 / FashionIQ R@10).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from transformers import (
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from ..checks import check_choice, check_positive_int
from ..retrieval.image_processing_targetpad import TargetPadImageProcessor  # noqa: F401  (a saved folder may name it)
from ..utils.caption_cache import (
    CaptionCache,
    captioner_key,
    default_caption_cache_dir,
    image_key,
)
from .auto import CIRPipelineMixin
from .caption_rewrite_recipes import RewriteRecipe, fill_rewrite_template, parse_rewrite
from .inputs import warn_truncated
from .query_inputs import (
    as_image_list,
    check_queries,
    load_distinct_images,
    split_pairs,
)
from .utils import encode_pixel_batches

__all__ = ["CaptionRewritePipeline", "CaptionRewritePipelineOutput"]

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from transformers import (AutoModelForCausalLM, AutoTokenizer, Blip2ForConditionalGeneration, Blip2Processor,
        ...     CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection)
        >>> from diffusers_cir import CaptionRewritePipeline

        >>> clip = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
        >>> pipe = CaptionRewritePipeline(
        ...     captioner=Blip2ForConditionalGeneration.from_pretrained("Salesforce/blip2-flan-t5-xxl", dtype=torch.bfloat16),
        ...     caption_processor=Blip2Processor.from_pretrained("Salesforce/blip2-flan-t5-xxl"),
        ...     llm=AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-7B-Instruct", dtype=torch.bfloat16),
        ...     llm_tokenizer=AutoTokenizer.from_pretrained("Qwen/Qwen2.5-7B-Instruct"),
        ...     text_encoder=CLIPTextModelWithProjection.from_pretrained(clip), tokenizer=CLIPTokenizer.from_pretrained(clip),
        ...     image_encoder=CLIPVisionModelWithProjection.from_pretrained(clip),
        ...     image_processor=CLIPImageProcessor.from_pretrained(clip),
        ...     recipe="cirevl-circo",  # or "cirevl-cirr", "cirevl-fashioniq", "ldre"
        ... ).to("cuda")
        >>> gallery = pipe.encode_image(["cat.jpg", "dog.jpg"])
        >>> out = pipe(image="dog.jpg", prompt="the same dog on a beach")
        >>> out.captions, out.rewrites  # what the query was made of
        >>> ldre = CaptionRewritePipeline(**pipe.components, recipe="ldre")  # same models, LDRE's recipe
        ```
"""


@dataclass
class CaptionRewritePipelineOutput(BaseOutput):
    """
    Args:
        image_embeds (`torch.Tensor` or `np.ndarray` of shape `(batch_size, projection_dim)`):
            Composed queries: the mean of the CLIP text embeddings of each query's rewrites, in the CLIP joint space
            (L2-normalised with `normalize=True`).
        captions (`list[list[str]]`): each query's reference captions.
        rewrites (`list[list[str]]`): each query's rewritten captions (`num_captions * rewrites_per_caption`).
        rewrite_embeds (`torch.Tensor` or `np.ndarray` of shape `(batch_size, num_rewrites, projection_dim)`):
            the CLIP text embedding of every rewrite (`image_embeds` is their mean).
        caption_embeds (`torch.Tensor` or `np.ndarray` of shape `(batch_size, num_captions, projection_dim)`):
            the CLIP text embedding of every caption, with `output_caption_embeds=True` (else `None`). With
            `rewrite_embeds` and the gallery, LDRE's adaptive ensemble ([`~diffusers_cir.retrieval.ldre_ensemble`])
            weights the rewrites over a whole query set.
    """

    image_embeds: torch.Tensor | np.ndarray
    captions: list[list[str]]
    rewrites: list[list[str]]
    rewrite_embeds: torch.Tensor | np.ndarray | None = None
    caption_embeds: torch.Tensor | np.ndarray | None = None


class CaptionRewritePipeline(CIRPipelineMixin, DiffusionPipeline):
    r"""
    Training-free CIR by captioning, LLM rewriting and CLIP text-to-image search (CIReVL, LDRE).

    Args:
        captioner ([`~transformers.PreTrainedModel`]): an image-to-text model with `generate()`: BLIP-2
            (`Blip2ForConditionalGeneration`) or a chat VLM (LLaVA, Qwen2-VL, ... via `AutoModelForImageTextToText`).
        caption_processor ([`~transformers.ProcessorMixin`]): its processor. A processor with a chat template gets
            the caption prompt as a user turn holding the image; one without (BLIP-2) gets the prompt as text.
        llm ([`~transformers.PreTrainedModel`]): a causal chat LM (`AutoModelForCausalLM`).
        llm_tokenizer ([`~transformers.PreTrainedTokenizerBase`]): its tokenizer, with a chat template. A tokenizer
            without a padding token pads with its end-of-sequence token.
        text_encoder ([`~transformers.CLIPTextModelWithProjection`]), tokenizer ([`~transformers.CLIPTokenizer`]):
            the CLIP text side that embeds the rewrites.
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`]), image_processor
            ([`~transformers.CLIPImageProcessor`]): the CLIP image side that embeds the gallery. CIReVL's authors
            preprocess the gallery with CLIP4Cir's "target pad" by default: pass a [`TargetPadImageProcessor`]
            (`image_processor_for(processor, "targetpad")`) to do the same.
        recipe (`str`, `dict` or [`RewriteRecipe`], defaults to `"cirevl-circo"`): a preset of
            [`REWRITE_RECIPES`] or the recipe fields; stored resolved in the pipeline's config.

    Captions are cached on disk under `pipe.caption_cache_dir` (see [`~diffusers_cir.utils.caption_cache`]); set it
    to `None` to keep nothing. The reference is read as pixels (its CLIP embedding says too little to caption), so
    the pipeline takes images, not `image_embeds`.
    """

    model_cpu_offload_seq = "captioner->llm->text_encoder->image_encoder"
    _gallery_components = ("image_encoder", "image_processor")
    _model_card_fields = {
        "tags": ["training-free", "cirevl", "ldre"],
        "paper": "Vision-by-Language for Training-Free Compositional Image Retrieval (Karthik et al., ICLR 2024), "
        "https://arxiv.org/abs/2310.09291; LDRE: LLM-based Divergent Reasoning and Ensemble for Zero-Shot Composed "
        "Image Retrieval (Yang et al., SIGIR 2024), https://doi.org/10.1145/3626772.3657740",
        "description": "A `CaptionRewritePipeline`: the reference image is captioned, a chat LLM rewrites each caption "
        "with the modification text, and the mean CLIP text embedding of the rewrites is searched against the CLIP "
        "image embeddings of the gallery. The recipe (prompts, decoding, numbers of captions and rewrites) is in the "
        "pipeline's config (`recipe`).",
    }

    def __init__(
        self,
        captioner: PreTrainedModel,
        caption_processor: ProcessorMixin,
        llm: PreTrainedModel,
        llm_tokenizer: PreTrainedTokenizerBase,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        image_encoder: CLIPVisionModelWithProjection,
        image_processor: CLIPImageProcessor,
        recipe: str | dict | RewriteRecipe = "cirevl-circo",
    ):
        super().__init__()
        resolved = RewriteRecipe.resolve(recipe)
        if not getattr(llm_tokenizer, "chat_template", None):
            raise ValueError(
                "`llm_tokenizer` has no chat template: use a chat (instruct) model's tokenizer, or set "
                "`llm_tokenizer.chat_template` to a Jinja template."
            )
        if llm_tokenizer.pad_token is None:
            llm_tokenizer.pad_token = llm_tokenizer.eos_token  # generation masks the padding; any token does
        if text_encoder.config.projection_dim != image_encoder.config.projection_dim:
            raise ValueError(
                f"The CLIP text tower projects to {text_encoder.config.projection_dim} dimensions but the vision "
                f"tower to {image_encoder.config.projection_dim}: both must come from one CLIP model."
            )
        self.register_modules(
            captioner=captioner, caption_processor=caption_processor, llm=llm, llm_tokenizer=llm_tokenizer,
            text_encoder=text_encoder, tokenizer=tokenizer, image_encoder=image_encoder, image_processor=image_processor,
        )
        self.register_to_config(recipe=dataclasses.asdict(resolved))
        self.caption_cache_dir = default_caption_cache_dir()
        self._captioner_key = None

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def recipe(self) -> RewriteRecipe:
        return RewriteRecipe(**self.config.recipe)

    @property
    def embedding_dim(self) -> int:
        """Width of the CLIP joint space (the towers' `projection_dim`)."""
        return self.image_encoder.config.projection_dim

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 64, device=None, show_progress: bool = False) -> torch.Tensor:
        """CLIP image embeddings `[N, projection_dim]` (projected, not normalised) of PIL images, paths, URLs, bytes,
        dataset image dicts or arrays, read one batch at a time."""
        batch_size = check_positive_int(batch_size, "batch_size")
        items = as_image_list(images, "images")
        batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
        batches = self.progress_bar(batches) if show_progress else batches
        device = device or self._execution_device
        return encode_pixel_batches(self.image_encoder, self.image_processor, batches, batch_size, device, "images")

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256, device=None) -> torch.Tensor:
        """CLIP text embeddings `[N, projection_dim]` (projected, not normalised), cut to the tower's length (77
        tokens; a warning says how many rewrites were cut)."""
        device = device or self._execution_device
        chunks, kept = [], []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True,
                max_length=self.tokenizer.model_max_length, return_tensors="pt",
            )
            kept += tokens.attention_mask.sum(dim=1).tolist()
            chunks.append(self.text_encoder(input_ids=tokens.input_ids.to(device)).text_embeds)
        warn_truncated(self.tokenizer, texts, kept, logger, "rewritten captions")
        return torch.cat(chunks)

    @contextlib.contextmanager
    def _seeded(self, offset: int):
        """Sampling seeded from the recipe (and the batch), without touching the caller's global random state."""
        device = self._execution_device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.recipe.seed + offset)
            yield

    def _generated_text(self, model, inputs: dict, outputs: torch.Tensor, decode) -> list[str]:
        # Decoder-only models return the prompt followed by the new tokens; encoder-decoders only the new tokens.
        config = getattr(model.config, "text_config", model.config)
        if not (model.config.is_encoder_decoder or getattr(config, "is_encoder_decoder", False)):
            outputs = outputs[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in decode(outputs, skip_special_tokens=True)]

    # ------------------------------------------------------------------------------------------------ captions

    def _caption_inputs(self, images: list, prompt: str | None) -> dict:
        processor = self.caption_processor
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
            text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            texts = [text] * len(images)
        else:
            texts = [prompt or ""] * len(images)  # BLIP-2: the prompt (or nothing) after the image's query tokens
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
        device, dtype = self._execution_device, self.captioner.dtype
        return {
            name: value.to(device, dtype) if value.is_floating_point() else value.to(device)
            for name, value in inputs.items()
        }

    @torch.no_grad()
    def generate_captions(self, images: list, batch_size: int = 8) -> list[list[str]]:
        """`recipe.num_captions` captions of each (loaded) image, from the cache where it holds them."""
        recipe = self.recipe
        cache = self._caption_cache()
        keys = [image_key(image) for image in images]
        found = {key: cache.get(key) for key in dict.fromkeys(keys)}
        missing = [key for key, captions in found.items() if captions is None or len(captions) != recipe.num_captions]
        first = {key: images[keys.index(key)] for key in missing}
        generation = dict(
            max_new_tokens=recipe.caption_max_new_tokens, num_return_sequences=recipe.num_captions,
            do_sample=recipe.caption_do_sample,
            **({"top_p": recipe.caption_top_p, "num_beams": 1} if recipe.caption_do_sample else {"num_beams": recipe.caption_num_beams}),
        )
        for start in range(0, len(missing), batch_size):
            batch_keys = missing[start : start + batch_size]
            inputs = self._caption_inputs([first[key] for key in batch_keys], recipe.caption_prompt)
            with self._seeded(start):
                outputs = self.captioner.generate(**inputs, **generation)
            texts = self._generated_text(self.captioner, inputs, outputs, self.caption_processor.batch_decode)
            for row, key in enumerate(batch_keys):
                found[key] = texts[row * recipe.num_captions : (row + 1) * recipe.num_captions]
                cache.put(key, found[key])
        return [list(found[key]) for key in keys]

    def _caption_cache(self) -> CaptionCache:
        if self.caption_cache_dir is None:
            return CaptionCache(None, "")
        if self._captioner_key is None or self._captioner_key[0] != self.config.recipe:
            settings = self.recipe.caption_settings()
            self._captioner_key = (self.config.recipe, captioner_key(self.captioner, self.caption_processor, settings))
        return CaptionCache(self.caption_cache_dir, self._captioner_key[1])

    # ------------------------------------------------------------------------------------------------ rewrites

    @torch.no_grad()
    def rewrite(self, captions: list[str], instructions: list[str], batch_size: int = 16) -> list[list[str]]:
        """`recipe.rewrites_per_caption` rewrites of each (caption, instruction) pair by the chat LLM."""
        recipe = self.recipe
        tokenizer = self.llm_tokenizer
        chats = []
        for caption, instruction in zip(captions, instructions):
            turns = [{"role": "system", "content": recipe.rewrite_system}] if recipe.rewrite_system else []
            turns.append({"role": "user", "content": fill_rewrite_template(recipe.rewrite_template, caption, instruction)})
            chats.append(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))
        sampling = (
            {"do_sample": True, "temperature": recipe.rewrite_temperature, "top_p": recipe.rewrite_top_p}
            if recipe.rewrite_do_sample else {"do_sample": False}
        )
        per = recipe.rewrites_per_caption
        rewrites = []
        for start in range(0, len(chats), batch_size):
            inputs = tokenizer(
                chats[start : start + batch_size], padding=True, padding_side="left", add_special_tokens=False,
                return_tensors="pt",
            ).to(self._execution_device)
            with self._seeded(start):
                outputs = self.llm.generate(
                    **inputs, max_new_tokens=recipe.rewrite_max_new_tokens, num_return_sequences=per,
                    pad_token_id=tokenizer.pad_token_id, **sampling,
                )
            answers = self._generated_text(self.llm, inputs, outputs, tokenizer.batch_decode)
            for row, instruction in enumerate(instructions[start : start + batch_size]):
                rewrites.append([
                    parse_rewrite(answer, instruction, recipe.rewrite_fallback) for answer in answers[row * per : (row + 1) * per]
                ])
        return rewrites

    def check_inputs(self, image, prompt, batch_size, caption_batch_size, rewrite_batch_size, output_type):
        """The reference images and modification texts, one of each per query (a single one is broadcast)."""
        for value, name in ((batch_size, "batch_size"), (caption_batch_size, "caption_batch_size"), (rewrite_batch_size, "rewrite_batch_size")):
            check_positive_int(value, name)
        check_choice(output_type, "output_type", ["pt", "np"])
        return check_queries(image, prompt)

    # ------------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image=None,
        prompt: str | list[str] | list[tuple[str, str]] | None = None,
        batch_size: int = 256,
        caption_batch_size: int = 8,
        rewrite_batch_size: int = 16,
        normalize: bool = False,
        output_caption_embeds: bool = False,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> CaptionRewritePipelineOutput | tuple:
        r"""
        Compose queries: caption each reference image, rewrite every caption with the modification text, embed the
        rewrites with CLIP and average them per query.

        Args:
            image (PIL image, path, URL, bytes, image dict or array, or a list of them): the reference images.
            prompt (`str`, `list[str]`, or a list holding `(str, str)` pairs): modification texts; a pair is
                FashionIQ's two captions, stripped of `.?, ` and joined with the recipe's `pair_separator` (`" and "`).
            batch_size (`int`, defaults to 256): rewrites per CLIP text-tower call.
            caption_batch_size (`int`, defaults to 8): images per captioner `generate()` call.
            rewrite_batch_size (`int`, defaults to 16): (caption, instruction) pairs per LLM `generate()` call.
            normalize (`bool`, defaults to `False`): L2-normalise the output.
            output_caption_embeds (`bool`, defaults to `False`): also embed the captions with CLIP (for LDRE's
                adaptive ensemble, [`~diffusers_cir.retrieval.ldre_ensemble`]).
            output_type (`"pt"` or `"np"`), return_dict (`bool`).

        A single image (or text) is broadcast against a list of the other.

        Examples:

        Returns:
            [`CaptionRewritePipelineOutput`] or `(image_embeds, captions, rewrites)`.
        """
        # 1. Check inputs
        images, texts = self.check_inputs(image, prompt, batch_size, caption_batch_size, rewrite_batch_size, output_type)
        instructions, _ = split_pairs(texts, self.recipe.pair_separator)

        # 2. Caption every distinct reference (from the cache where it holds them)
        captions = self.generate_captions(load_distinct_images(images, "image"), batch_size=caption_batch_size)

        # 3. Rewrite every (caption, modification) pair with the chat LLM
        pairs = [(caption, instruction) for per_image, instruction in zip(captions, instructions) for caption in per_image]
        flat = self.rewrite([caption for caption, _ in pairs], [instruction for _, instruction in pairs], rewrite_batch_size)
        per_query = len(flat) // len(instructions)
        rewrites = [
            [text for group in flat[row * per_query : (row + 1) * per_query] for text in group]
            for row in range(len(instructions))
        ]

        # 4. CLIP text embeddings of the rewrites, averaged per query (LDRE's ensemble; one rewrite for CIReVL)
        embeds = self.encode_text([text for group in rewrites for text in group], batch_size=batch_size)
        rewrite_embeds = embeds.view(len(instructions), -1, embeds.shape[-1])
        query = rewrite_embeds.mean(dim=1)
        if normalize:
            query = F.normalize(query.float(), dim=-1).to(query.dtype)
        caption_embeds = None
        if output_caption_embeds:
            caption_embeds = self.encode_text([text for group in captions for text in group], batch_size=batch_size)
            caption_embeds = caption_embeds.view(len(instructions), -1, caption_embeds.shape[-1])

        self.maybe_free_model_hooks()
        if output_type == "np":
            query, rewrite_embeds = query.float().cpu().numpy(), rewrite_embeds.float().cpu().numpy()
            caption_embeds = None if caption_embeds is None else caption_embeds.float().cpu().numpy()
        if not return_dict:
            return (query, captions, rewrites)
        return CaptionRewritePipelineOutput(
            image_embeds=query, captions=captions, rewrites=rewrites, rewrite_embeds=rewrite_embeds,
            caption_embeds=caption_embeds,
        )
