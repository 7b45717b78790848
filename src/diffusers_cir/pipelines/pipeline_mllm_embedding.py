# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Multimodal-LLM embedders on LLaVA-NeXT (E5-V, BGE-VL-MLLM) as a CIR pipeline.

An MLLM embedder reads a prompt that holds the image (and, for a composed query, the modification text) and takes the
hidden state of the prompt's last token after the language model's final norm as the embedding. Gallery images and
composed queries go through the same model with two prompts, so they land in one space. One forward pass per batch,
no ``generate()``.

What is verified, and where (the facts are data; the code is ours):

E5-V (Jiang et al., 2024, arXiv:2407.12580; github.com/kongds/E5-V ``README.md`` and ``retrieval.py``; model
``royokong/e5-v``, a ``LlavaNextForConditionalGeneration`` fine-tuned from llama3-llava-next-8b):

* pooling: ``hidden_states[-1][:, -1, :]`` of the full model, i.e. the language model's last-token output after the
  final norm (read here from the base model's ``last_hidden_state`` while the vocabulary projection runs for the last
  position only; ``tests/test_pipeline_mllm_embedding.py`` checks the two agree), then L2-normalised (retrieval
  normalises);
* prompt format: the Llama-3 chat wrapping
  ``<|start_header_id|>user<|end_header_id|>\\n\\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n \\n``
  (quoted from the README; the tokenizer adds ``<|begin_of_text|>``);
* CIR prompts (``retrieval.py``, read at commit bcefe73): written for LLaVA-Mistral as ``[INST] ... [/INST]``; for
  E5-V (``--use_e5v`` sets ``llava_llama3``) the strings ``"[INST] "`` and ``" [/INST]"`` are deleted and the rest goes
  into the Llama-3 wrapping, so the space before ``[/INST]`` goes too and every CIR prompt ends in ``:`` (unlike the
  README's ``": "``). Gallery ``<image>\\n Describe this image in one word:``, composed ``<image>Modify this image
  with "<sent>", desribe modified image in one word:`` (their spelling kept: the prompt is what the model was
  evaluated with); FashionIQ gallery ``<image>\\n Describe this {category} in one word based on its style:`` and
  composed ``<image> change the style of this {category} to <sent>\\n Desribe this modified {category} in one word
  based on its style:`` with ``toptee`` spelled ``shirt``; FashionIQ's two captions stripped of ``.?, ``, joined
  with ``", "``, both orders encoded and the two raw embeddings summed before normalisation;
* text prompt: ``<sent>\\nSummary above sentence in one word: `` (README), for :meth:`encode_text`;
* batching: ``retrieval.py`` evaluates one input per batch by default (``batch_size=1``), so nothing is padded there.
  Here batches are padded on the left, so position ``-1`` is every prompt's last token, and a batch gives the same
  embeddings as one input at a time (up to float rounding: LLaVA-NeXT's language models use rotary positions, which
  see only relative offsets, and the padding is masked; tested).

BGE-VL-MLLM (Zhou et al., 2024, MegaPairs, arXiv:2412.14475; github.com/VectorSpaceLab/MegaPairs ``README.md``; the
model's remote code ``modeling_llavanext_for_embedding.py``, ``LLaVANextForEmbedding``, read from a copy of that file
found by code search, 16 kB like the Hub's; the Hub repository itself could not be read from here):

* the model is a ``LlavaNextForConditionalGeneration`` (llava-v1.6-mistral-7b) whose forward returns the language
  model's final-norm hidden states instead of logits; the README pools ``[:, -1, :]`` and L2-normalises: the same
  pooling as E5-V, so no remote code is needed to compute it;
* query prompt ``[INST] \\n <instruct> {instruction} <query>  {text} \\n <image> [/INST]``, candidate prompt
  ``[INST]  <image> [/INST]`` (the strings that file's ``prepare_text_input`` assembles), with the README's CIR
  instruction "Retrieve the target image that best meets the combined criteria by using both the provided image and
  the image retrieval instructions: ";
* every image resized to 512 x 512 (``PIL.Image.resize``, bicubic for RGB) before the processor.

Not verified for BGE-VL-MLLM (so not claimed): the Hub repository's tokenizer and processor files (padding side; we pad
left, which last-token pooling needs); the instructions the authors used per benchmark (the README gives the one CIR
instruction used here); how FashionIQ's two captions were joined (``" and "`` here, an assumption); a text-only query
prompt (none is published, so ``encode_text`` refuses this preset). The weights load with the plain transformers class
(``LLaVANextForEmbedding`` subclasses it without new parameters); no remote code runs.

Published zero-shot numbers (CIRCO mAP@5 / CIRR test R@1 / FashionIQ val R@10 average): BGE-VL-MLLM (LLaVA-1.6,
7.57B) 42.2 / 46.7 / 35.6; E5-V (LLaVA-NeXT-8B) 19.1 / 33.9 / 31.8. Not reproduced here: that needs the full models
and the benchmark images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, replace_example_docstring
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

from ..checks import check_choice, check_positive_int
from .auto import CIRPipelineMixin, resolve_pretrained_path
from .query_inputs import (
    as_image_list,
    check_queries,
    load_distinct_images,
    load_images,
    split_pairs,
)

__all__ = ["MLLM_PROMPT_PRESETS", "MLLMEmbeddingPipeline", "MLLMEmbeddingPipelineOutput", "MLLMPrompts"]

_LLAMA3_CHAT = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
_BGE_VL_CIR_INSTRUCTION = (
    "Retrieve the target image that best meets the combined criteria by using both the provided image and the image "
    "retrieval instructions: "
)


@dataclass(frozen=True)
class MLLMPrompts:
    """The prompts that make a LLaVA-NeXT model an embedder (a preset name or these fields, as data)."""

    name: str  # a label (the preset's name, or "custom")
    image_prompt: str  # gallery images: holds the image token "<image>" once
    composed_prompt: str  # queries: "<image>" once and "{text}" (the modification text) once
    text_prompt: str | None = None  # text-only inputs for `encode_text`: "{text}" once, no image; None: none published
    image_size: int | None = None  # resize every image to image_size x image_size before the processor (BGE-VL: 512)
    pair_separator: str = ", "  # joins FashionIQ's two captions (each stripped of ".?, ")

    def check(self, image_token: str = "<image>") -> MLLMPrompts:
        for field, template, texts in (
            ("image_prompt", self.image_prompt, 0),
            ("composed_prompt", self.composed_prompt, 1),
            ("text_prompt", self.text_prompt, 1),
        ):
            if template is None and field == "text_prompt":
                continue
            if not isinstance(template, str):
                raise TypeError(f"`prompts.{field}` must be a string, got {type(template).__name__}.")
            images = 0 if field == "text_prompt" else 1
            if template.count(image_token) != images or template.count("{text}") != texts:
                raise ValueError(
                    f"`prompts.{field}` must hold the image token {image_token!r} {images} time(s) and '{{text}}' "
                    f"{texts} time(s), got {template!r}."
                )
        if self.image_size is not None:
            check_positive_int(self.image_size, "prompts.image_size")
        return self

    @classmethod
    def resolve(cls, prompts: str | dict | MLLMPrompts) -> MLLMPrompts:
        """A preset name (see :data:`MLLM_PROMPT_PRESETS`), a dict of the fields, or an instance."""
        if isinstance(prompts, MLLMPrompts):
            return prompts
        if isinstance(prompts, str):
            return MLLM_PROMPT_PRESETS[check_choice(prompts, "prompts", sorted(MLLM_PROMPT_PRESETS))]
        if isinstance(prompts, dict):
            fields = {field.name for field in dataclasses.fields(cls)}
            unknown = sorted(set(prompts) - fields)
            if unknown:
                raise ValueError(f"`prompts` has unknown fields {unknown}; the fields are {sorted(fields)}.")
            return cls(**{"name": "custom", **prompts})
        raise ValueError(
            f"`prompts` must be a preset name ({sorted(MLLM_PROMPT_PRESETS)}), a dict or an MLLMPrompts, got "
            f"{type(prompts).__name__}."
        )


def _e5v_fashioniq(category: str) -> MLLMPrompts:
    word = "shirt" if category == "toptee" else category  # the authors' choice for toptee
    return MLLMPrompts(
        name=f"e5-v-fashioniq-{category}",
        image_prompt=_LLAMA3_CHAT.format(f"<image>\n Describe this {word} in one word based on its style:"),
        composed_prompt=_LLAMA3_CHAT.format(
            f"<image> change the style of this {word} to {{text}}\n Desribe this modified {word} in one word based on "
            "its style:"
        ),
        text_prompt=_LLAMA3_CHAT.format("{text}\nSummary above sentence in one word: "),
    )


MLLM_PROMPT_PRESETS: dict[str, MLLMPrompts] = {
    "e5-v": MLLMPrompts(
        name="e5-v",
        image_prompt=_LLAMA3_CHAT.format("<image>\n Describe this image in one word:"),
        composed_prompt=_LLAMA3_CHAT.format('<image>Modify this image with "{text}", desribe modified image in one word:'),
        text_prompt=_LLAMA3_CHAT.format("{text}\nSummary above sentence in one word: "),
    ),
    **{f"e5-v-fashioniq-{category}": _e5v_fashioniq(category) for category in ("dress", "shirt", "toptee")},
    "bge-vl-mllm": MLLMPrompts(
        name="bge-vl-mllm",
        image_prompt="[INST]  <image> [/INST]",
        composed_prompt=f"[INST] \n <instruct> {_BGE_VL_CIR_INSTRUCTION} <query>  {{text}} \n <image> [/INST]",
        text_prompt=None,
        image_size=512,
        pair_separator=" and ",
    ),
}
"""Named prompt sets: ``e5-v`` (CIRR / CIRCO), ``e5-v-fashioniq-{dress,shirt,toptee}``, ``bge-vl-mllm``."""


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_cir import AutoCIRPipeline

        >>> # an E5-V (royokong/e5-v) or BGE-VL-MLLM folder as released: assembled once into a pipeline folder
        >>> pipe = AutoCIRPipeline.from_pretrained("e5-v", torch_dtype=torch.bfloat16).to("cuda")
        >>> gallery = pipe.encode_image(["cat.jpg", "dog.jpg"], batch_size=8)  # [2, 4096]
        >>> query = pipe(image="dog.jpg", prompt="the same dog on a beach").image_embeds  # [1, 4096]
        >>> scores = torch.nn.functional.normalize(query, dim=-1) @ torch.nn.functional.normalize(gallery, dim=-1).T

        >>> # FashionIQ dresses: E5-V's category prompts, both caption orders
        >>> pipe = AutoCIRPipeline.from_pretrained("e5-v", prompts="e5-v-fashioniq-dress", torch_dtype=torch.bfloat16)
        >>> query = pipe(image="dress.jpg", prompt=[("is red", "has no sleeves")]).image_embeds
        ```
"""


@dataclass
class MLLMEmbeddingPipelineOutput(BaseOutput):
    """
    Args:
        image_embeds (`torch.Tensor` or `np.ndarray` of shape `(batch_size, hidden_size)`):
            Composed query embeddings: the last prompt token's final hidden state, in the model's dtype (float32
            for `"np"`). L2-normalised with `normalize=True`.
    """

    image_embeds: torch.Tensor | np.ndarray


class MLLMEmbeddingPipeline(CIRPipelineMixin, DiffusionPipeline):
    r"""
    Composed image retrieval with a LLaVA-NeXT model used as an embedder (E5-V, BGE-VL-MLLM).

    Args:
        model ([`~transformers.LlavaNextForConditionalGeneration`]): the multimodal LLM. Load 7-8B models in
            bfloat16 (`torch_dtype=torch.bfloat16`; casting a loaded model with `.to(torch.bfloat16)` also rounds the
            language model's rotary frequencies, which moves the embeddings); `device_map=` / `max_memory=` /
            `offload_folder=` in `from_pretrained` place it with accelerate (GPU, CPU and disk offload), with the same
            embeddings as the whole model in memory (tested in bfloat16 with disk offload).
        processor ([`~transformers.LlavaNextProcessor`]): its tokenizer and image processor (anyres tiling).
        prompts (`str`, `dict` or [`MLLMPrompts`], defaults to `"e5-v"`): a preset of
            [`MLLM_PROMPT_PRESETS`] or the prompt fields; stored resolved in the pipeline's config.

    The gallery embedding depends on the image prompt, so `fingerprint` covers it with the model and processor.
    """

    model_cpu_offload_seq = "model"
    _gallery_components = ("model", "processor")
    _model_card_fields = {
        "tags": ["mllm-embedding", "llava-next", "e5-v", "bge-vl-mllm"],
        "paper": "E5-V: Universal Embeddings with Multimodal Large Language Models (Jiang et al., 2024), "
        "https://arxiv.org/abs/2407.12580; MegaPairs: Massive Data Synthesis For Universal Multimodal Retrieval "
        "(Zhou et al., 2024), https://arxiv.org/abs/2412.14475",
        "description": "An `MLLMEmbeddingPipeline`: a LLaVA-NeXT model used as an embedder. A gallery image is embedded "
        "with the gallery prompt and a query (reference image and modification text) with the composed prompt; the "
        "embedding is the last prompt token's final hidden state, and queries and gallery are compared by the dot "
        "product of the normalised embeddings. The prompt set is in the pipeline's config (`prompts`).",
    }

    def __init__(
        self,
        model: LlavaNextForConditionalGeneration,
        processor: LlavaNextProcessor,
        prompts: str | dict | MLLMPrompts = "e5-v",
    ):
        super().__init__()
        resolved = MLLMPrompts.resolve(prompts).check(processor.image_token)
        image_token_id = model.config.image_token_id
        if processor.image_token_id != image_token_id:
            raise ValueError(
                f"The processor's image token {processor.image_token!r} has id {processor.image_token_id}, but the "
                f"model expects image tokens with id {image_token_id} (config.image_token_id): use the processor "
                "saved with this model."
            )
        if processor.patch_size is None or processor.vision_feature_select_strategy is None:
            raise ValueError(
                "The processor has no `patch_size` / `vision_feature_select_strategy`, so it cannot expand the image "
                "token: set them from the model config (the released-folder conversion does this), e.g. "
                "`processor.patch_size = model.config.vision_config.patch_size`."
            )
        self.register_modules(model=model, processor=processor)
        self.register_to_config(prompts=dataclasses.asdict(resolved))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a pipeline folder. `device_map` (`"auto"`, `"sequential"`, a dict, ...), `max_memory` and
        `offload_folder` place the language model with transformers/accelerate, spilling layers to CPU or disk
        when it does not fit (the diffusers pipeline-level `device_map` only places whole components)."""
        placement = {name: kwargs.pop(name) for name in ("device_map", "max_memory", "offload_folder") if name in kwargs}
        if placement and "model" not in kwargs:
            local = resolve_pretrained_path(pretrained_model_name_or_path, kwargs)
            dtype = kwargs.get("torch_dtype")
            kwargs["model"] = LlavaNextForConditionalGeneration.from_pretrained(
                os.path.join(local, "model"), dtype=dtype, **placement
            )
            pretrained_model_name_or_path = local
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def prompts(self) -> MLLMPrompts:
        return MLLMPrompts(**self.config.prompts)

    @property
    def embedding_dim(self) -> int:
        """The language model's hidden size (4096 for E5-V and BGE-VL-MLLM)."""
        return self.model.config.text_config.hidden_size

    @property
    def fingerprint(self) -> str:
        """The model's and processor's digest with the gallery prompt and image size folded in."""
        prompts = self.prompts
        gallery_side = json.dumps([prompts.image_prompt, prompts.image_size])
        return hashlib.blake2b(f"{super().fingerprint}\n{gallery_side}".encode(), digest_size=16).hexdigest()

    def _prepare_images(self, images: list[PIL.Image.Image]) -> list[PIL.Image.Image]:
        size = self.prompts.image_size
        if size is None:
            return images
        return [image.resize((size, size), PIL.Image.Resampling.BICUBIC) for image in images]

    @torch.no_grad()
    def embed_prompts(
        self, prompts: list[str], images: list[PIL.Image.Image] | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """Last-token embeddings `[len(prompts), hidden_size]` of filled prompts, one forward pass, no logits.

        `images` (one per prompt, in order, already loaded) fill the prompts' image tokens.
        """
        device = device or self._execution_device
        inputs = self.processor(
            text=prompts,
            images=self._prepare_images(images) if images else None,
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        inputs = {name: value.to(device) for name, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        # The base model's output is the final-norm hidden states; the embedding is read there by a hook while the
        # full model runs with logits for the last position only (not 128k x 4096 per token for E5-V). The full model
        # is called, not its base, so that offload hooks on it (enable_model_cpu_offload, device_map) run.
        captured = []

        def keep_last_token(module, args, output):
            captured.append(output.last_hidden_state[:, -1])

        handle = self.model.model.register_forward_hook(keep_last_token)
        try:
            self.model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            handle.remove()
        return captured[0]

    def _batched(self, prompts: list[str], images: list | None, batch_size: int, show_progress: bool, device=None):
        """Embeddings of `prompts` in chunks; `images` (sources, read one chunk at a time, or loaded PIL images)
        fill the image tokens, one per prompt."""
        starts = range(0, len(prompts), batch_size)
        chunks = []
        for start in self.progress_bar(starts) if show_progress else starts:
            batch_images = None
            if images is not None:
                batch_images = load_images(images[start : start + batch_size], "images", offset=start)
            chunks.append(self.embed_prompts(prompts[start : start + batch_size], batch_images, device=device))
        return torch.cat(chunks)

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 16, device=None, show_progress: bool = False) -> torch.Tensor:
        """Gallery embeddings `[N, hidden_size]` (not normalised) of PIL images, paths, URLs, bytes, dataset image
        dicts or arrays, with the gallery prompt. Images are read one batch at a time."""
        batch_size = check_positive_int(batch_size, "batch_size")
        items = as_image_list(images, "images")
        return self._batched([self.prompts.image_prompt] * len(items), items, batch_size, show_progress, device)

    @torch.no_grad()
    def encode_text(self, texts: str | list[str], batch_size: int = 64, device=None, show_progress: bool = False) -> torch.Tensor:
        """Text-only embeddings `[N, hidden_size]` with the text prompt (E5-V: "Summary above sentence in one
        word"), for text-to-image search against the same gallery."""
        from ..checks import check_texts

        texts = check_texts(texts, "texts")
        template = self.prompts.text_prompt
        if template is None:
            raise ValueError(
                f"The prompt set {self.prompts.name!r} has no text prompt (none is published for it): pass "
                "`prompts={..., 'text_prompt': '... {text} ...'}` when building the pipeline."
            )
        batch_size = check_positive_int(batch_size, "batch_size")
        return self._batched([template.replace("{text}", text) for text in texts], None, batch_size, show_progress, device)

    def check_inputs(self, image, prompt, batch_size, output_type) -> tuple[list, list]:
        """The reference images and the modification texts, one of each per query (a single one is broadcast)."""
        check_positive_int(batch_size, "batch_size")
        check_choice(output_type, "output_type", ["pt", "np"])
        return check_queries(image, prompt)

    # ------------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image=None,
        prompt: str | list[str] | list[tuple[str, str]] | None = None,
        batch_size: int = 16,
        normalize: bool = False,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> MLLMEmbeddingPipelineOutput | tuple:
        r"""
        Encode composed queries (reference image + modification text) with the composed prompt.

        Args:
            image (PIL image, path, URL, bytes, image dict or array, or a list of them): the reference images.
            prompt (`str`, `list[str]`, or a list holding `(str, str)` pairs): modification texts. A pair is
                FashionIQ's two captions: each is stripped of `.?, `, they are joined with the prompt set's
                `pair_separator` in both orders, and the query is the mean of the two raw embeddings (E5-V sums
                them; the direction is the same).
            batch_size (`int`, defaults to 16): prompts per forward pass.
            normalize (`bool`, defaults to `False`): L2-normalise the output.
            output_type (`"pt"` or `"np"`), return_dict (`bool`).

        A single image (or text) is broadcast against a list of the other.

        Examples:

        Returns:
            [`MLLMEmbeddingPipelineOutput`] or `(image_embeds,)`.
        """
        # 1. Check inputs
        images, texts = self.check_inputs(image, prompt, batch_size, output_type)

        # 2. Fill the composed prompt: FashionIQ pairs add their reversed order after the forward prompts
        forward, reverse_of = split_pairs(texts, self.prompts.pair_separator)
        template = self.prompts.composed_prompt
        filled = [template.replace("{text}", text) for text in forward + [pair[1] for pair in reverse_of]]
        loaded = load_distinct_images(images, "image")
        refs = loaded + [loaded[row] for row, _ in reverse_of]

        # 3. One forward pass per batch of prompts
        embeds = self._batched(filled, refs, batch_size, show_progress=len(filled) > batch_size)

        # 4. Both caption orders of a pair average into one query
        query = embeds[: len(forward)].clone()
        for offset, (row, _) in enumerate(reverse_of):
            query[row] = (query[row] + embeds[len(forward) + offset]) / 2
        if normalize:
            query = F.normalize(query.float(), dim=-1).to(query.dtype)

        self.maybe_free_model_hooks()
        if output_type == "np":
            query = query.float().cpu().numpy()
        if not return_dict:
            return (query,)
        return MLLMEmbeddingPipelineOutput(image_embeds=query)
