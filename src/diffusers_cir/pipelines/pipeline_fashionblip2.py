# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""FashionBLIP-2 (Garderes et al., "FACap: A Large-scale Fashion Dataset for Fine-grained Composed Image Retrieval",
SIGIR GENNEXT 2025): BLIP-2 fine-tuned for composed retrieval with lightweight adapters and multi-head
query-candidate matching.

The model is transformers' ``Blip2ForImageTextRetrieval`` (vision tower, Q-Former with its query tokens and text
embeddings). A composed query runs the Q-Former on the query tokens *and* the modification text's tokens together,
cross-attending to the reference image's patch features (BLIP-2's image-grounded text encoding); a gallery image runs
it on the query tokens alone. A :class:`~diffusers_cir.models.MultiHeadMatchingHead` turns each side's token states
into one vector whose inner products are the heads' mean cosine similarity. Adapters (peft LoRA on the Q-Former and
vision tower) are merged into ``model`` before saving, so a saved folder needs no peft to run.

The composed query reads the reference's patch features, not its gallery vector: ``image_embeds`` is not a query
input of this pipeline (retrieval passes it the reference images).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging, replace_example_docstring

from ..checks import check_choice, check_positive_int, check_texts

# The component classes a saved folder's model_index.json can name must be imported.
from ..models.multi_head_matching import MultiHeadMatchingHead
from .auto import CIRPipelineMixin
from .inputs import check_batch_sizes, check_float_pixels, check_tensor, check_tensor_data, warn_truncated
from .utils import check_image_paths, encode_pixel_batches, loadable_image_list

logger = logging.get_logger(__name__)

__all__ = ["FashionBLIP2Pipeline", "FashionBLIP2PipelineOutput", "candidate_states", "query_states"]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_cir import AutoCIRPipeline

        >>> pipe = AutoCIRPipeline.from_pretrained("fashionblip2-facap")  # a saved FashionBLIP2Pipeline folder
        >>> gallery = pipe.encode_image(["dress1.jpg", "dress2.jpg"])  # [2, num_heads * head_dim]
        >>> query = pipe(image="reference.jpg", prompt="is red with long sleeves").image_embeds
        >>> scores = query @ gallery.T  # the mean over heads of the heads' cosine similarities
        ```
"""


def candidate_states(model, patches: torch.Tensor) -> torch.Tensor:
    """``model``'s (a ``Blip2ForImageTextRetrieval``, adapters or not) query-token states of images."""
    queries = model.query_tokens.expand(patches.shape[0], -1, -1)
    return model.qformer(query_embeds=queries, encoder_hidden_states=patches).last_hidden_state


def query_states(model, patches: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The query-token states when the tokens read the text beside the image in one Q-Former pass (BLIP-2's
    image-grounded text encoding); the text tokens' own states are not returned."""
    queries = model.query_tokens.expand(patches.shape[0], -1, -1)
    embeddings = model.embeddings(input_ids=input_ids, query_embeds=queries)
    ones = torch.ones(queries.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
    states = model.qformer(query_embeds=embeddings, query_length=queries.shape[1],
                           attention_mask=torch.cat([ones, attention_mask], dim=1),
                           encoder_hidden_states=patches).last_hidden_state
    return states[:, : queries.shape[1]]


@dataclass
class FashionBLIP2PipelineOutput(BaseOutput):
    """Output of :class:`FashionBLIP2Pipeline`.

    Args:
        image_embeds (`torch.Tensor` or `np.ndarray` of shape `(batch_size, num_heads * head_dim)`):
            The composed queries (unit vectors), in the gallery's multi-head space.
    """

    image_embeds: torch.Tensor | np.ndarray


class FashionBLIP2Pipeline(CIRPipelineMixin, DiffusionPipeline):
    r"""
    FashionBLIP-2: composed image retrieval with BLIP-2's Q-Former and a multi-head matching head.

    Args:
        model ([`~transformers.Blip2ForImageTextRetrieval`]): BLIP-2's vision tower, Q-Former, query tokens and
            Q-Former text embeddings (adapters merged).
        matching_head ([`~diffusers_cir.models.MultiHeadMatchingHead`]): the query and candidate head poolings.
        tokenizer: BLIP-2's BERT tokenizer.
        image_processor: BLIP-2's image processor (`BlipImageProcessor`).
    """

    _cir_abstract = False
    _gallery_components = ("model", "matching_head", "image_processor")
    model_cpu_offload_seq = "model->matching_head"
    _model_card_fields = {
        "tags": ["fashionblip2", "blip-2", "multi-head-matching"],
        "paper": "FACap: A Large-scale Fashion Dataset for Fine-grained Composed Image Retrieval (Garderes et al., "
        "SIGIR GENNEXT 2025), https://arxiv.org/abs/2507.07135",
        "description": "A `FashionBLIP2Pipeline`: BLIP-2's Q-Former composes the reference image with the "
        "modification text; a multi-head matching head embeds queries and gallery images so that their inner "
        "product is the heads' mean cosine similarity.",
    }

    def __init__(self, model, matching_head: MultiHeadMatchingHead, tokenizer, image_processor):
        super().__init__()
        self.register_modules(model=model, matching_head=matching_head, tokenizer=tokenizer,
                              image_processor=image_processor)
        if model is None or matching_head is None:
            return  # diffusers builds pipelines with missing components while loading
        width = model.config.qformer_config.hidden_size
        if matching_head.config.hidden_size != width:
            raise ValueError(f"The matching head reads Q-Former states of width {matching_head.config.hidden_size} "
                             f"but the Q-Former's are {width} wide: build the head with hidden_size={width}.")

    @property
    def embedding_dim(self) -> int:
        return int(self.matching_head.embedding_dim)

    # ------------------------------------------------------------------------------------------------ images

    def _image_batches(self, images, name: str, batch_size: int) -> list:
        """`images` split into batches after every check that needs no pixels (a missing file fails at once)."""
        if torch.is_tensor(images):
            size = int(self.model.config.vision_config.image_size)
            check_tensor(images, name, ("N", 3, size, size), rows_of="image")
            check_float_pixels(images, name)
            return list(images.split(batch_size))
        items = loadable_image_list(images, name)
        check_image_paths(items, name)
        return [list(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch_size, num_patches + 1, vision_width)`: what the Q-Former cross-attends to."""
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def candidate_states(self, patches: torch.Tensor) -> torch.Tensor:
        """The Q-Former's query-token states of images (BLIP-2's image side)."""
        return candidate_states(self.model, patches)

    def query_states(self, patches: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The Q-Former's query-token states when they read the modification text beside the reference image."""
        return query_states(self.model, patches, input_ids, attention_mask)

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 64, device: torch.device | None = None, show_progress: bool = False):
        """Gallery embeddings `(N, num_heads * head_dim)` (unit vectors).

        Args:
            images: a PIL image, an image file path or URL, encoded bytes, a `datasets` image dict, a list of them, or
                pixel values `(N, 3, H, W)` as the image processor makes them.
            batch_size (`int`, defaults to 64): images per forward pass.
            device (`torch.device`, *optional*): where to run (defaults to the pipeline's execution device).
            show_progress (`bool`, defaults to `False`): a progress bar over the batches.
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        check_tensor_data({"images": images})
        device = device or self._execution_device
        batches = self._image_batches(images, "images", batch_size)

        def gallery_embeds(model, pixel_values):
            states = candidate_states(model, model.vision_model(pixel_values=pixel_values).last_hidden_state)
            return self.matching_head(states, side="candidate").embeds

        return encode_pixel_batches(self.model, self.image_processor, self.progress_bar(batches) if show_progress else
                                    batches, batch_size, device, "images", features=gallery_embeds)

    # ------------------------------------------------------------------------------------------------ text

    def tokenize_prompt(self, prompt: str | list[str]) -> dict:
        """`input_ids` and `attention_mask` for the Q-Former (cut at its positions, with one warning per call)."""
        prompts = check_texts(prompt, "prompt")
        max_length = min(int(self.tokenizer.model_max_length), int(self.model.config.qformer_config.max_position_embeddings))
        tokens = self.tokenizer(prompts, padding="longest", max_length=max_length, truncation=True, return_tensors="pt")
        lengths = tokens.attention_mask.sum(dim=1).tolist()
        if max(lengths) >= max_length:
            warn_truncated(self.tokenizer, prompts, lengths, logger, limit=max_length, reader="the Q-Former")
        return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}

    # ------------------------------------------------------------------------------------------------ call

    def check_inputs(self, image, prompt, batch_size, output_type) -> int:
        """Every argument of `__call__`, checked once before any file is read or model runs; returns the number of
        queries."""
        check_positive_int(batch_size, "batch_size")
        check_choice(output_type, "output_type", ("pt", "np"))
        if image is None:
            raise ValueError("Pass the reference image as `image` (FashionBLIP-2 composes from its patch features).")
        if prompt is None:
            raise ValueError("Pass the modification text as `prompt`.")
        check_tensor_data({"image": image})
        sizes = {"image": sum(len(batch) for batch in self._image_batches(image, "image", batch_size)),
                 "prompt": len(check_texts(prompt, "prompt"))}
        return check_batch_sizes(sizes)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PIL.Image.Image | str | os.PathLike | list | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        batch_size: int = 64,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        r"""
        Compose queries: the Q-Former reads each reference image together with its modification text.

        Args:
            image (PIL image, image file path or URL, encoded bytes, `datasets` image dict, a list of them, or pixel
                values `(N, 3, H, W)`): the reference images.
            prompt (`str` or list of `str`): the modification texts; a text longer than the Q-Former reads is cut
                there, with one warning per call.
            batch_size (`int`, defaults to 64): queries per forward pass.
            output_type (`str`, defaults to `"pt"`): `"pt"` or `"np"`.
            return_dict (`bool`, defaults to `True`): return a [`FashionBLIP2PipelineOutput`] or a tuple.

        A single reference (or a single text) is broadcast against a batch of the other.

        Examples:

        Returns:
            [`FashionBLIP2PipelineOutput`] or `(image_embeds,)`.
        """
        # 1. Check inputs
        num_queries = self.check_inputs(image, prompt, batch_size, output_type)
        device = self._execution_device

        # 2. Tokens of the modification texts, broadcast to the queries
        tokens = self.tokenize_prompt(prompt)
        input_ids = tokens["input_ids"].to(device).expand(num_queries, -1)
        attention_mask = tokens["attention_mask"].to(device).expand(num_queries, -1)

        # 3. Patch features of the references, broadcast to the queries
        batches = self._image_batches(image, "image", batch_size)
        patches = encode_pixel_batches(self.model, self.image_processor, batches, batch_size, device, "image",
                                       features=lambda model, pixels: model.vision_model(pixel_values=pixels)
                                       .last_hidden_state)
        patches = patches.expand(num_queries, -1, -1)

        # 4. Image-grounded Q-Former states and the query side of the matching head, a batch at a time
        composed = []
        for start in range(0, num_queries, batch_size):
            rows = slice(start, start + batch_size)
            states = self.query_states(patches[rows], input_ids[rows], attention_mask[rows])
            composed.append(self.matching_head(states, side="query").embeds)
        query_embeds = torch.cat(composed)

        # 5. Convert
        self.maybe_free_model_hooks()
        if output_type == "np":
            query_embeds = query_embeds.float().cpu().numpy()
        if not return_dict:
            return (query_embeds,)
        return FashionBLIP2PipelineOutput(image_embeds=query_embeds)
