# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""CompoDiff: composed image retrieval by denoising a CLIP image embedding.

A query is a reference image (or none), a modification text, optionally a negative text and a mask. The pipeline
encodes them with CLIP, runs the CompoDiff prior with three-way classifier-free guidance and returns the composed
query embedding, in the CLIP image-embedding space of the gallery.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ..models.compodiff_transformer import CompoDiffTransformer
from ..schedulers.scheduling_compodiff import CompoDiffScheduler
from .lora import CompoDiffLoraLoaderMixin
from .auto import CIRPipelineMixin
from .utils import check_image_paths, is_image_path, load_image_paths

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from diffusers_cir import CompoDiffPipeline

        >>> pipe = CompoDiffPipeline.from_pretrained("compodiff-aesthetic-diffusers")  # a converted folder
        >>> query = pipe(
        ...     image=Image.open("dress.jpg"), prompt="the same dress in red", negative_prompt="low quality",
        ...     generator=torch.Generator().manual_seed(0), normalize=True,
        ... ).image_embeds  # [1, 768], search it against CLIP ViT-L/14 image embeddings of the gallery
        ```
"""


@dataclass
class CompoDiffPipelineOutput(BaseOutput):
    """
    Args:
        image_embeds (`torch.Tensor` or `np.ndarray` of shape `(batch_size, embedding_dim)`):
            The composed query embeddings (averaged over `num_samples_per_query`), in the CLIP image space. Always
            float32: the sample and the guidance run in float32 whatever the model precision.
    """

    image_embeds: torch.Tensor | np.ndarray


PromptType = str | list[str] | None
ImageType = PIL.Image.Image | str | os.PathLike | list[PIL.Image.Image | str | os.PathLike] | torch.Tensor | np.ndarray | None


class CompoDiffPipeline(CIRPipelineMixin, DiffusionPipeline, CompoDiffLoraLoaderMixin):
    r"""
    Pipeline for composed image retrieval with CompoDiff.

    Args:
        transformer ([`CompoDiffTransformer`]): The denoiser (prior) over CLIP image embeddings.
        scheduler ([`CompoDiffScheduler`], or diffusers' `DDIMScheduler` / `DPMSolverMultistepScheduler` configured
            with `beta_schedule="squaredcos_cap_v2"`, `prediction_type="sample"` and `clip_sample=False`).
        text_encoder ([`~transformers.CLIPTextModel`], *optional*): Gives the text hidden states (the released
            models use the CLIP ViT-bigG/14 text tower, width 1280).
        tokenizer ([`~transformers.CLIPTokenizer`], *optional*).
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`], *optional*): Gives reference/gallery image
            embeddings (CLIP ViT-L/14 for the released models).
        image_processor ([`~transformers.CLIPImageProcessor`], *optional*).

    The encoders are optional: without them the pipeline runs on precomputed `image_embeds` / `prompt_embeds`.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer"
    _model_card_fields = {
        "tags": ["compodiff"],
        "paper": "CompoDiff: Versatile Composed Image Retrieval With Latent Diffusion (Gu et al., TMLR 2024), "
        "https://arxiv.org/abs/2303.11916",
        "description": "A `CompoDiffPipeline`: a diffusion prior that denoises a CLIP image embedding conditioned on a "
        "reference image, a modification text, an optional negative text and an optional mask; the result is searched "
        "against the CLIP image embeddings of a gallery.",
    }
    _optional_components = ["text_encoder", "tokenizer", "image_encoder", "image_processor"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: CompoDiffTransformer,
        scheduler,
        text_encoder: CLIPTextModel | CLIPTextModelWithProjection | None = None,
        tokenizer: CLIPTokenizer | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        image_processor: CLIPImageProcessor | None = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            image_encoder=image_encoder,
            image_processor=image_processor,
        )

    # ------------------------------------------------------------------ encoders

    @property
    def embedding_dim(self) -> int:
        return self.transformer.config.embedding_dim

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], device: torch.device | None = None) -> torch.Tensor:
        """CLIP text last hidden states `[batch, 77, text_embedding_dim]` of one or more prompts.

        Runs without autograd (like `encode_image`): a cached result, e.g. a negative prompt encoded once, does not
        keep the text tower's activations alive.
        """
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "This pipeline has no `text_encoder`/`tokenizer`: pass `prompt_embeds` (and `negative_prompt_embeds`)."
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not all(isinstance(text, str) for text in prompts):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
        if not prompts:
            raise ValueError("`prompt` is an empty list: pass at least one string.")
        device = device or self._execution_device
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        output = self.text_encoder(
            input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
        )
        return output.last_hidden_state

    def _pixel_values(self, images, device, dtype) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images.to(device=device, dtype=dtype)
        if self.image_processor is None:
            raise ValueError("This pipeline has no `image_processor`: pass preprocessed pixel values or `image_embeds`.")
        pixel_values = self.image_processor(images=images, return_tensors="pt").pixel_values
        return pixel_values.to(device=device, dtype=dtype)

    def _pixel_values_of_list(self, images: list, name: str, device, dtype) -> torch.Tensor:
        """`[N, 3, H, W]` pixel values of per-query images, each prepared as it would be alone.

        A tensor is the pixel values of one image already (`[3, H, W]`, or `[1, 3, H, W]`); anything else (a PIL
        image, an array) goes through the image processor. A list may mix them: without this, a tensor next to a PIL
        image was preprocessed a second time (normalised twice), or stacking failed with a bare TypeError.
        """
        runs = []  # consecutive items of one kind: [is_tensor, first index, items]
        for index, item in enumerate(images):
            is_tensor = isinstance(item, torch.Tensor)
            if is_tensor:
                if item.ndim == 4 and item.shape[0] == 1:
                    item = item[0]
                if item.ndim != 3:
                    raise ValueError(
                        f"`{name}`[{index}] is a tensor of shape {tuple(item.shape)}: a tensor in a list of images must "
                        "be the pixel values of one image, [3, H, W]."
                    )
            if runs and runs[-1][0] == is_tensor:
                runs[-1][2].append(item)
            else:
                runs.append([is_tensor, index, [item]])
        blocks = [
            torch.stack(items).to(device=device, dtype=dtype) if is_tensor else self._pixel_values(items, device, dtype)
            for is_tensor, _, items in runs
        ]
        if len({tuple(block.shape[1:]) for block in blocks}) > 1:
            found = ", ".join(
                f"{'PIL image' if isinstance(items[0], PIL.Image.Image) else type(items[0]).__name__} at index {start} "
                f"-> {tuple(block.shape[1:])}"
                for (_, start, items), block in zip(runs, blocks)
            )
            raise ValueError(
                f"`{name}` mixes pixel-value tensors and images whose pixel values differ in size ({found}): give "
                "tensors at the image processor's output size, or give every item as a PIL image."
            )
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    @torch.no_grad()
    def encode_image(
        self,
        images: ImageType,
        batch_size: int = 64,
        device: torch.device | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """CLIP image embeddings `[N, embedding_dim]` (projected, not normalised) of PIL images, image file paths
        or pixel values.

        This is how gallery images are encoded, so that queries and gallery share one space. Paths are read one batch
        at a time.
        """
        if self.image_encoder is None:
            raise ValueError("This pipeline has no `image_encoder`: pass `image_embeds` instead of images.")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        images = _as_image_list(images, "images")
        check_image_paths(images, "images")
        device = device or self._execution_device
        dtype = self.image_encoder.dtype
        chunks = range(0, len(images), batch_size)
        if show_progress:
            chunks = self.progress_bar(chunks)
        embeds = []
        for start in chunks:
            batch = load_image_paths(images[start : start + batch_size], "images", offset=start)
            pixel_values = self._pixel_values_of_list(batch, "images", device, dtype)
            embeds.append(self.image_encoder(pixel_values=pixel_values).image_embeds)
        return torch.cat(embeds)

    def prepare_mask(
        self, mask_image, batch_size: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference recipe: binarise the mask at the CLIP input size (its pixels are zeroed in the normalised
        reference image) and resize it to the denoiser's `mask_size` grid, binarised again.

        A PIL mask, and an array/tensor mask of any other size than the CLIP input (`image_processor.crop_size`), is
        resized and center-cropped by the image processor exactly like the reference image, so a mask drawn over the
        photo (e.g. a segmentation of the same height and width) covers the same content. An array/tensor already at
        the CLIP input size is read in that grid as it is (the case of preprocessed `pixel_values`).

        Returns `(mask [batch, mask_size, mask_size], pixel_mask [batch, 1, H, W] or None)`; an all-zero mask stays zero.
        """
        size = self.transformer.config.mask_size
        masks = load_image_paths(_as_image_list(mask_image, "mask_image"), "mask_image")
        if len(masks) not in (1, batch_size):
            raise ValueError(f"`mask_image` has {len(masks)} masks for {batch_size} queries (give one, or one per query).")
        clip_size = self._clip_input_size()
        pixel_masks = []
        for index, item in enumerate(masks):
            if not isinstance(item, PIL.Image.Image):
                tensor = item.detach().float().cpu() if isinstance(item, torch.Tensor) else torch.as_tensor(np.asarray(item)).float()
                if tensor.ndim == 3 and tensor.shape[0] == 1:
                    tensor = tensor[0]
                if tensor.ndim != 2:
                    raise ValueError(
                        f"A tensor/array `mask_image` must be [H, W] or [1, H, W] per query (values in [0, 1]), "
                        f"got {tuple(tensor.shape)} for query {index}."
                    )
                tensor = (tensor > 0.5).float()
                if self.image_processor is None or tuple(tensor.shape) == clip_size:
                    pixel_masks.append(tensor[None, None])
                    continue
                item = PIL.Image.fromarray(tensor.numpy().astype(np.uint8) * 255, mode="L")
            if self.image_processor is None:
                raise ValueError("A PIL `mask_image` needs the pipeline's `image_processor`; pass a tensor instead.")
            pixel_masks.append(
                self.image_processor(images=[item.convert("RGB")], do_normalize=False, return_tensors="pt").pixel_values[:, :1]
            )
        if len({tuple(pixel_mask.shape) for pixel_mask in pixel_masks}) > 1:
            raise ValueError(
                f"The `mask_image` masks have different sizes {[tuple(m.shape[-2:]) for m in pixel_masks]}: without an "
                "`image_processor` to bring them to the CLIP input size, pass masks of one size."
            )
        pixel_mask = (torch.cat(pixel_masks) > 0.5).float().to(device)
        mask = F.interpolate(pixel_mask, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mask = (mask[:, 0] > 0.5).float()
        if mask.shape[0] != batch_size:  # one mask for every query: prepared once
            mask, pixel_mask = mask.expand(batch_size, -1, -1), pixel_mask.expand(batch_size, -1, -1, -1)
        return mask, pixel_mask

    def _clip_input_size(self) -> tuple[int, int] | None:
        """`(height, width)` of the pixel values the image processor produces, when it center-crops to a fixed size."""
        processor = self.image_processor
        crop_size = getattr(processor, "crop_size", None) if processor is not None else None
        if crop_size is None or not getattr(processor, "do_center_crop", False):
            return None
        if isinstance(crop_size, int):
            return (crop_size, crop_size)
        crop_size = dict(crop_size)
        if crop_size.get("height") is None or crop_size.get("width") is None:
            return None
        return (crop_size["height"], crop_size["width"])

    # ------------------------------------------------------------------ checks

    def check_inputs(
        self,
        image,
        prompt,
        negative_prompt,
        image_embeds,
        prompt_embeds,
        negative_prompt_embeds,
        mask_image,
        mask,
        num_inference_steps,
        num_samples_per_query,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> int:
        """Validate the arguments and return the number of queries."""
        if image is not None and image_embeds is not None:
            raise ValueError("Pass either `image` or `image_embeds`, not both.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if mask_image is not None and mask is not None:
            raise ValueError("Pass either `mask_image` (any size, binarised and resized) or `mask`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("A query needs a text: pass `prompt` or `prompt_embeds`.")
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if not isinstance(num_samples_per_query, int) or isinstance(num_samples_per_query, bool) or num_samples_per_query < 1:
            raise ValueError(f"`num_samples_per_query` must be a positive integer, got {num_samples_per_query!r}.")
        if output_type not in ("pt", "np"):
            raise ValueError(f"`output_type` must be 'pt' or 'np', got {output_type!r}.")
        for name in callback_on_step_end_tensor_inputs or []:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"`callback_on_step_end_tensor_inputs` may name {self._callback_tensor_inputs}, got {name!r}.")

        sizes = {}
        for name, texts in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if texts is not None:
                sizes[name] = _count_texts(name, texts)
        text_dim = self.transformer.config.text_embedding_dim
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is None:
                continue
            if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != text_dim:
                shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise ValueError(f"`{name}` must be a tensor of shape [batch, length, {text_dim}], got {shape}.")
            sizes[name] = embeds.shape[0]
        if image_embeds is not None:
            if not isinstance(image_embeds, torch.Tensor):
                raise ValueError(f"`image_embeds` must be a torch.Tensor, got {type(image_embeds).__name__}.")
            if image_embeds.ndim == 3 and image_embeds.shape[1] == 1:
                image_embeds = image_embeds[:, 0]
            if image_embeds.ndim != 2 or image_embeds.shape[-1] != self.embedding_dim:
                raise ValueError(
                    f"`image_embeds` must have shape [batch, {self.embedding_dim}], got {tuple(image_embeds.shape)}."
                )
            sizes["image_embeds"] = image_embeds.shape[0]
        if image is not None:
            sizes["image"] = len(_as_image_list(image, "image"))
            check_image_paths(image, "image")
        if mask is not None:
            size = self.transformer.config.mask_size
            if not isinstance(mask, torch.Tensor) or mask.ndim != 3 or tuple(mask.shape[1:]) != (size, size):
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"`mask` must be a tensor of shape [batch, {size}, {size}], got {shape}.")
            sizes["mask"] = mask.shape[0]
        if mask_image is not None:
            sizes["mask_image"] = len(_as_image_list(mask_image, "mask_image"))
            check_image_paths(mask_image, "mask_image")

        # Every condition holds one entry per query, or a single one that serves every query (one reference image
        # with several modification texts, one text applied to several images, one negative text or mask).
        batch_size = max(sizes.values())
        if any(size not in (1, batch_size) for size in sizes.values()):
            raise ValueError(
                f"Batch sizes do not match: {sizes}. Give each condition one entry per query, or a single one for all."
            )
        if batch_size == 0:
            raise ValueError(f"No query to compose: {' and '.join(f'`{name}`' for name in sizes)} hold no entries.")
        return batch_size

    @staticmethod
    def check_generator(generator, batch_size: int, num_samples_per_query: int) -> None:
        """A list of generators must give one generator per row of noise (query-major, as `latents`)."""
        if isinstance(generator, (list, tuple)):
            rows = batch_size * num_samples_per_query
            if len(generator) != rows or not all(isinstance(item, torch.Generator) for item in generator):
                raise ValueError(
                    f"`generator` as a list must hold one torch.Generator per row of noise: {rows} "
                    f"({batch_size} queries x {num_samples_per_query} num_samples_per_query), got a list of "
                    f"{len(generator)} holding {sorted({type(item).__name__ for item in generator})}; or pass a "
                    "single generator."
                )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}."
            )

    # ------------------------------------------------------------------ sampling

    def _step_kwargs(self, generator, eta) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        if eta is not None:
            if "eta" not in accepted:
                raise ValueError(f"{type(self.scheduler).__name__}.step takes no `eta`.")
            kwargs["eta"] = eta
        return kwargs

    # ------------------------------------------------------------------ fast paths

    def enable_cuda_graphs(self, max_graphs: int = 8, compile_blocks: bool = False) -> None:
        """Capture the whole sampling run (context included) as a CUDA graph per input shape and replay it.

        Opt-in low-latency mode for the reference `CompoDiffScheduler` on CUDA: the first call of each shape
        (batch size, samples, steps, guidance scales) captures, later calls replay. Calls with a
        `callback_on_step_end`, other schedulers and CPU execution use the eager path.

        `compile_blocks=True` also compiles every transformer block with `torch.compile` (fusing its many small
        element-wise kernels) before capture; the first call then takes a minute to compile.
        """
        from .fast_sampling import CompoDiffGraphSampler

        if compile_blocks:
            self.transformer.compile_repeated_blocks(dynamic=False)
        self._graph_sampler = CompoDiffGraphSampler(max_graphs=max_graphs)

    def disable_cuda_graphs(self) -> None:
        self._graph_sampler = None

    def _sample_reference(
        self, conditions, latents, num_inference_steps, guidance_scale, image_guidance_scale, samples, generator,
        eta, callback_on_step_end, callback_tensor_inputs,
    ) -> torch.Tensor:
        from .fast_sampling import ReferencePlan, reference_sampling_loop

        device = latents.device
        plan = ReferencePlan.build(self.scheduler, num_inference_steps, eta, device)
        # Every draw up front, in the reference's order (after the initial noise, one per noisy step).
        step_noises = [
            randn_tensor(latents.shape, generator=generator, device=device, dtype=torch.float32)
            for _ in range(plan.noisy_steps)
        ]
        options = dict(guidance_scale=float(guidance_scale), image_guidance_scale=float(image_guidance_scale),
                       num_samples_per_query=samples)
        graph_sampler = getattr(self, "_graph_sampler", None)
        if graph_sampler is not None and device.type == "cuda" and callback_on_step_end is None:
            inputs = dict(conditions, latents=latents, step_noises=step_noises)
            return graph_sampler(self.transformer, plan, inputs, **options)

        progress_bar = self.progress_bar(total=len(plan.timesteps))

        def on_step(index, timestep, step_latents):
            if callback_on_step_end is not None:
                step_locals = {"latents": step_latents}
                callback_kwargs = {}
                for name in callback_tensor_inputs:  # a loop, not a comprehension (Python 3.11 scoping)
                    callback_kwargs[name] = step_locals[name]
                step_latents = callback_on_step_end(self, index, timestep, callback_kwargs).pop("latents", step_latents)
            progress_bar.update()
            return step_latents

        with progress_bar:
            return reference_sampling_loop(
                self.transformer, plan, latents=latents, step_noises=step_noises, on_step=on_step, **conditions, **options
            )

    def _sample_with_scheduler(
        self, conditions, latents, num_inference_steps, guidance_scale, image_guidance_scale, samples, generator,
        eta, callback_on_step_end, callback_tensor_inputs,
    ) -> torch.Tensor:
        """Any diffusers scheduler configured for x0 prediction (`prediction_type="sample"`)."""
        from .fast_sampling import guided_prediction

        if getattr(self.scheduler.config, "prediction_type", "sample") != "sample":
            raise ValueError(
                f"The CompoDiff denoiser predicts x0: configure {type(self.scheduler).__name__} with "
                f"prediction_type='sample' (got {self.scheduler.config.prediction_type!r})."
            )
        if getattr(self.scheduler.config, "clip_sample", False):
            raise ValueError(
                f"{type(self.scheduler).__name__} has clip_sample=True, which clips CLIP embeddings to [-1, 1]: "
                "set clip_sample=False."
            )
        context = self.transformer.encode_guidance_context(
            conditions["image_embeds"], conditions["prompt_embeds"], conditions["negative_prompt_embeds"], conditions["mask"]
        )
        if samples > 1:
            context = context.repeat_interleave(samples)
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for index, t in enumerate(timesteps):
                model_input = self.scheduler.scale_model_input(latents, t).to(self.transformer.dtype)
                prediction = self.transformer(torch.cat([model_input] * 3), t, context=context).predicted_image_embedding
                x0 = guided_prediction(prediction.float(), guidance_scale, image_guidance_scale)
                latents = self.scheduler.step(x0, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    step_locals = {"latents": latents}
                    callback_kwargs = {}
                    for name in callback_tensor_inputs:  # a loop, not a comprehension (Python 3.11 scoping)
                        callback_kwargs[name] = step_locals[name]
                    latents = callback_on_step_end(self, index, t, callback_kwargs).pop("latents", latents)
                progress_bar.update()
        return latents

    @torch.no_grad()
    def __call__(
        self,
        image: ImageType = None,
        prompt: PromptType = None,
        negative_prompt: PromptType = None,
        mask_image: ImageType = None,
        image_embeds: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        num_inference_steps: int = 10,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        num_samples_per_query: int = 1,
        source_weight: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float | None = None,
        normalize: bool = False,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> CompoDiffPipelineOutput | tuple:
        r"""
        Compose queries: reference image(s) + modification text(s) -> CLIP image embedding(s).

        Every condition holds one entry per query, or a single entry shared by every query: one reference image
        with several texts, one text applied to several images, one negative text or mask for all.

        Args:
            image (PIL image(s), image file path(s), or pixel values `[B, 3, H, W]`, *optional*): Reference images.
                Without `image` and `image_embeds` the query is text only (the image condition is a zero embedding).
                A path (`str` / `os.PathLike`, or an http(s) URL) is read with `diffusers.utils.load_image`. A list
                may mix PIL images, paths and `[3, H, W]` pixel-value tensors: each is prepared as it would be alone.
            prompt (`str` or `list[str]`): Modification texts ("as a pencil sketch").
            negative_prompt (`str` or `list[str]`, *optional*): What the result should not have. Defaults to `""`.
            mask_image (PIL image(s), image file path(s) or `[H, W]` tensors/arrays, *optional*): Region of the
                reference to change (white = 1): those pixels are zeroed before CLIP encoding and the mask conditions
                the denoiser. A mask is resized and cropped like the reference image, unless it is a tensor/array
                already at the CLIP input size (see `prepare_mask`).
            image_embeds (`[B, D]`), prompt_embeds (`[B, L, text_dim]`), negative_prompt_embeds, mask
                (`[B, mask_size, mask_size]`), *optional*: Precomputed conditions instead of images/texts/masks.
            num_inference_steps (`int`, defaults to 10): Steps of the sampler. With `CompoDiffScheduler` the
                reference grid makes `num_inference_steps - 1` network calls.
            guidance_scale (`float`, defaults to 7.5): Text guidance `w_text`.
            image_guidance_scale (`float`, defaults to 1.5): Image guidance `w_image`.
                The guided prediction is `u + (c - n) * w_text + (n - u) * w_image`.
            num_samples_per_query (`int`, defaults to 1): Samples drawn per query and averaged.
            source_weight (`float`, defaults to 0.0): Mix `(1 - w) * result + w * reference embedding` (0.1
                keeps more of the reference image; ignored for text-only queries).
            generator (`torch.Generator` or a list of `batch_size * num_samples_per_query` of them, *optional*):
                Makes the result deterministic; a list gives each row of noise (query-major) its own generator.
            latents (`[B * num_samples_per_query, D]`, *optional*): Initial noise.
            eta (`float`, *optional*): Sampler stochasticity, for schedulers whose `step` takes it.
            normalize (`bool`, defaults to `False`): L2-normalise the output (what retrieval needs).
            output_type (`"pt"` or `"np"`).
            return_dict (`bool`, defaults to `True`).
            callback_on_step_end (`Callable`, *optional*): Called as `callback(pipe, step, timestep, kwargs)` after
                every step; may return `{"latents": ...}` to replace them.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): Tensors passed to the callback.

        Returns:
            [`CompoDiffPipelineOutput`] or a tuple `(image_embeds,)`.
        """
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        batch_size = self.check_inputs(
            image, prompt, negative_prompt, image_embeds, prompt_embeds, negative_prompt_embeds, mask_image, mask,
            num_inference_steps, num_samples_per_query, output_type, callback_on_step_end_tensor_inputs,
        )
        self.check_generator(generator, batch_size, num_samples_per_query)
        # Paths are read once, here, after the cheap checks and before any tower runs.
        if image is not None:
            image = load_image_paths(image, "image")
        if mask_image is not None:
            mask_image = load_image_paths(mask_image, "mask_image")
        device = self._execution_device
        dtype = self.transformer.dtype
        text_only = image is None and image_embeds is None

        # 1. mask
        pixel_mask = None
        if mask_image is not None:
            mask, pixel_mask = self.prepare_mask(mask_image, batch_size, device)
        elif mask is not None and mask.shape[0] == 1 and batch_size > 1:
            mask = mask.expand(batch_size, -1, -1)
        if mask is None:
            mask = torch.zeros(batch_size, self.transformer.config.mask_size, self.transformer.config.mask_size)
        mask = mask.to(device=device, dtype=dtype)

        # 2. reference image embedding
        if image is not None:
            pixel_values = self._pixel_values_of_list(
                _as_image_list(image, "image"), "image", device,
                self.image_encoder.dtype if self.image_encoder is not None else dtype,
            )
            if pixel_mask is not None:
                if pixel_values.shape[0] == 1 and len(_as_image_list(mask_image, "mask_image")) == 1:
                    pixel_mask = pixel_mask[:1]  # one image, one mask: encode the masked image once
                if pixel_mask.shape[-2:] != pixel_values.shape[-2:]:
                    pixel_mask = F.interpolate(pixel_mask, size=pixel_values.shape[-2:], mode="nearest")
                pixel_values = pixel_values * (1 - pixel_mask.to(pixel_values.dtype))
            if self.image_encoder is None:
                raise ValueError("This pipeline has no `image_encoder`: pass `image_embeds` instead of `image`.")
            image_embeds = self.image_encoder(pixel_values=pixel_values).image_embeds
        elif image_embeds is None:
            image_embeds = torch.zeros(batch_size, self.embedding_dim)
        if image_embeds.ndim == 3:
            image_embeds = image_embeds[:, 0]
        if image_embeds.shape[0] == 1 and batch_size > 1:  # one reference image for every query
            image_embeds = image_embeds.expand(batch_size, -1)
        image_embeds = image_embeds.to(device=device, dtype=dtype)

        # 3. texts: the prompts and negative texts given as strings go through the text tower in one call
        pending = {}
        if prompt_embeds is None:
            pending["prompt"] = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt_embeds is None:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            pending["negative"] = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if pending:
            encoded = self.encode_prompt([text for texts in pending.values() for text in texts], device)
            encoded = dict(zip(pending, encoded.split([len(texts) for texts in pending.values()])))
            prompt_embeds = encoded.get("prompt", prompt_embeds)
            negative_prompt_embeds = encoded.get("negative", negative_prompt_embeds)
        if prompt_embeds.shape[0] == 1 and batch_size > 1:  # one modification text for every query
            prompt_embeds = prompt_embeds.expand(batch_size, -1, -1)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        if negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
            raise ValueError(
                f"`prompt_embeds` ({prompt_embeds.shape[1]} tokens) and `negative_prompt_embeds` "
                f"({negative_prompt_embeds.shape[1]} tokens) must have the same length."
            )

        # 4. initial noise ((b r) order as the reference: each query's samples are consecutive rows)
        samples = num_samples_per_query
        shape = (batch_size * samples, self.embedding_dim)
        # Noise is drawn in float32 whatever the model precision, so a seed gives the same query in every precision.
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            if latents.ndim == 3 and latents.shape[1] == 1:
                latents = latents[:, 0]
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {list(shape)}, got {tuple(latents.shape)}.")
            latents = latents.to(device=device, dtype=torch.float32)

        # 5. denoise
        conditions = dict(image_embeds=image_embeds, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, mask=mask)
        if isinstance(self.scheduler, CompoDiffScheduler):
            latents = self._sample_reference(
                conditions, latents, num_inference_steps, guidance_scale, image_guidance_scale, samples, generator,
                eta, callback_on_step_end, callback_on_step_end_tensor_inputs,
            )
        else:
            latents = self._sample_with_scheduler(
                conditions, latents, num_inference_steps, guidance_scale, image_guidance_scale, samples, generator,
                eta, callback_on_step_end, callback_on_step_end_tensor_inputs,
            )

        # 7. average the samples of each query, mix in the source, normalise
        result = latents.float().view(batch_size, samples, -1).mean(dim=1)
        if source_weight and not text_only:
            result = (1 - source_weight) * result + source_weight * image_embeds.float()
        if normalize:
            result = F.normalize(result, dim=-1)

        self.maybe_free_model_hooks()
        if output_type == "np":
            result = result.float().cpu().numpy()
        if not return_dict:
            return (result,)
        return CompoDiffPipelineOutput(image_embeds=result)


def _count_texts(name: str, texts) -> int:
    """How many texts `texts` holds (a string is one); anything but a string or a list/tuple of strings is refused."""
    if isinstance(texts, str):
        return 1
    if isinstance(texts, (list, tuple)) and all(isinstance(text, str) for text in texts):
        return len(texts)
    holding = f" holding {sorted({type(text).__name__ for text in texts})}" if isinstance(texts, (list, tuple)) else ""
    raise ValueError(f"`{name}` must be a string or a list of strings, got {type(texts).__name__}{holding}.")


def _as_image_list(images, name: str) -> list:
    """A list of per-query images (PIL, paths, arrays or tensors) from one image, a list, or a batched tensor/array."""
    if isinstance(images, PIL.Image.Image) or is_image_path(images):
        return [images]
    if isinstance(images, torch.Tensor):
        if images.ndim == 4 or (name == "mask_image" and images.ndim == 3):
            return list(images)
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4 or (name == "mask_image" and images.ndim == 3 and images.shape[-1] not in (1, 3, 4)):
            return list(images)
        return [images]
    if isinstance(images, (list, tuple)) and len(images) > 0:
        return list(images)
    raise ValueError(
        f"`{name}` must be a PIL image, an image file path, a list of them, or a tensor/array, got {type(images).__name__}"
        + (" (empty)" if isinstance(images, (list, tuple)) else "")
        + "."
    )
