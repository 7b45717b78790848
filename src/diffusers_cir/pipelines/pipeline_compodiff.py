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
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5Tokenizer,
)

from ..checks import (
    check_choice,
    check_float,
    check_int,
    check_positive_int,
    check_texts,
)
from ..models.compodiff_text import CompoDiffTextConditioner, is_t5_encoder
from ..models.compodiff_transformer import CompoDiffTransformer
from ..retrieval.images import pixel_values as processed_pixel_values
from ..schedulers.scheduling_compodiff import CompoDiffScheduler
from .auto import CIRPipelineMixin
from .fast_sampling import CompoDiffSamplingMixin, mix_and_normalize
from .inputs import (
    check_batch_sizes,
    check_float_pixels,
    check_generator,
    check_not_both,
    check_tensor,
    check_tensor_data,
    clip_input_size,
    first_of_encode_prompt,
    image_list,
    is_batch,
    shape_of,
    warn_truncated,
)
from .lora import CompoDiffLoraLoaderMixin
from .utils import check_image_paths, is_loadable_image, load_image_paths

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


logger = logging.get_logger(__name__)

# Guidance scales beyond this are refused as mistakes (a unit or exponent typo), not choices: the released models use
# 7.5 and 1.5 and past a few tens the result is the branch difference alone, while 1e4 times a CLIP-scale difference
# stays far inside float32 (1e30 made every output inf/NaN without an error).
GUIDANCE_SCALE_LIMIT = 1e4

PromptType = str | list[str] | None
ImageType = PIL.Image.Image | str | os.PathLike | list[PIL.Image.Image | str | os.PathLike] | torch.Tensor | np.ndarray | None


class CompoDiffPipeline(CIRPipelineMixin, CompoDiffSamplingMixin, DiffusionPipeline, CompoDiffLoraLoaderMixin):
    r"""
    Pipeline for composed image retrieval with CompoDiff.

    Args:
        transformer ([`CompoDiffTransformer`]): The denoiser (prior) over CLIP image embeddings.
        scheduler ([`CompoDiffScheduler`], or diffusers' `DDIMScheduler` / `DPMSolverMultistepScheduler` configured
            with `beta_schedule="squaredcos_cap_v2"`, `prediction_type="sample"` and `clip_sample=False`).
        text_encoder ([`~transformers.CLIPTextModel`] or [`~transformers.T5EncoderModel`], *optional*): Gives the
            text hidden states (the released models use the CLIP ViT-bigG/14 text tower, width 1280; the paper's
            models CLIP ViT-L/14, width 768).
        tokenizer ([`~transformers.CLIPTokenizer`] or [`~transformers.T5Tokenizer`], *optional*).
        text_encoder_2 ([`~transformers.T5EncoderModel`], *optional*), tokenizer_2: A second text encoder read with
            the first (CLIP + T5-XL, the paper's best variant); the two sequences are joined as
            `diffusers_cir.models.compodiff_text` describes.
        image_embeds_norm (`float`, *optional*): The L2 norm the reference image embedding is rescaled to before the
            denoiser reads it, the scale the model was trained with (this package's trainer records it); `None`
            (the released models) reads the embedding as the image encoder gives it.
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`], *optional*): Gives reference/gallery image
            embeddings (CLIP ViT-L/14 for the released models).
        image_processor ([`~transformers.CLIPImageProcessor`], *optional*).

    The encoders are optional: without them the pipeline runs on precomputed `image_embeds` / `prompt_embeds`.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->transformer"
    _model_card_fields = {
        "tags": ["compodiff"],
        "paper": "CompoDiff: Versatile Composed Image Retrieval With Latent Diffusion (Gu et al., TMLR 2024), "
        "https://arxiv.org/abs/2303.11916",
        "description": "A `CompoDiffPipeline`: a diffusion prior that denoises a CLIP image embedding conditioned on a "
        "reference image, a modification text, an optional negative text and an optional mask; the result is searched "
        "against the CLIP image embeddings of a gallery.",
    }
    _optional_components = ["text_encoder", "tokenizer", "image_encoder", "image_processor", "text_encoder_2",
                            "tokenizer_2"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: CompoDiffTransformer,
        scheduler,
        text_encoder: CLIPTextModel | CLIPTextModelWithProjection | T5EncoderModel | None = None,
        tokenizer: CLIPTokenizer | T5Tokenizer | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        image_processor: CLIPImageProcessor | None = None,
        text_encoder_2: T5EncoderModel | CLIPTextModel | None = None,
        tokenizer_2: T5Tokenizer | CLIPTokenizer | None = None,
        image_embeds_norm: float | None = None,
    ):
        super().__init__()
        if image_embeds_norm is not None:
            check_float(image_embeds_norm, "image_embeds_norm", 0.0, exclusive_minimum=True)
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("`text_encoder_2` and `tokenizer_2` go together: pass both or neither.")
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            image_encoder=image_encoder,
            image_processor=image_processor,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.register_to_config(image_embeds_norm=image_embeds_norm)

    # ------------------------------------------------------------------ encoders

    @property
    def embedding_dim(self) -> int:
        return self.transformer.config.embedding_dim

    @property
    def text_conditioner(self) -> CompoDiffTextConditioner:
        """How texts become the text condition (one encoder, or two joined); also what training encodes with."""
        return CompoDiffTextConditioner(self.text_encoder, self.tokenizer, getattr(self, "text_encoder_2", None),
                                        getattr(self, "tokenizer_2", None))

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(prompt_embeds, negative_prompt_embeds)`, as diffusers pipelines return them: CLIP text last hidden states
        `[batch * num_images_per_prompt, 77, text_embedding_dim]` of the prompts, and of the negative texts (`""` by
        default) with classifier-free guidance, else `None`. Pass them to the pipeline as `prompt_embeds=` /
        `negative_prompt_embeds=` (with `num_images_per_prompt=1` here: the call repeats them itself).

        The texts given as strings go through the text tower in one call; given embeddings are passed through. A
        single negative text that serves every prompt stays one row (the denoiser projects it once for the batch).
        Runs without autograd: a cached result, e.g. a negative text encoded once, does not keep the tower's
        activations alive.

        Before diffusers-cir 0.1 this returned `prompt_embeds` alone; the pipeline still reads the tuple passed where
        that tensor went (with a deprecation warning).
        """
        check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        self._check_texts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_classifier_free_guidance)
        prompt_embeds, negative_prompt_embeds = self._encode_prompt(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_classifier_free_guidance,
            device or self._execution_device,
        )
        if num_images_per_prompt > 1:
            prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] > 1:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def _encode_prompt(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, with_negative, device):
        """The two text embeddings of checked arguments, the texts given as strings encoded in one call."""
        pending = {}
        if prompt_embeds is None:
            pending["prompt"] = [prompt] if isinstance(prompt, str) else list(prompt)
        if with_negative and negative_prompt_embeds is None:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            pending["negative"] = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if pending:
            encoded = self._encode_texts([text for texts in pending.values() for text in texts], device)
            encoded = dict(zip(pending, encoded.split([len(texts) for texts in pending.values()])))
            prompt_embeds = encoded.get("prompt", prompt_embeds)
            negative_prompt_embeds = encoded.get("negative", negative_prompt_embeds)
        return prompt_embeds, negative_prompt_embeds if with_negative else None

    def _encode_texts(self, prompts: list[str], device) -> torch.Tensor:
        conditioner = self.text_conditioner
        input_ids, attention_masks, kept = conditioner.tokenize(prompts)
        for tokenizer, encoder, length, counts in zip(
            conditioner.tokenizers, conditioner.text_encoders, conditioner.lengths, kept
        ):
            warn_truncated(tokenizer, prompts, counts, logger, "texts (prompts and negative prompts)", length,
                           "the T5 encoder" if is_t5_encoder(encoder) else "the CLIP text encoder")
        return conditioner.encode_ids(input_ids, attention_masks, device)

    def _pixel_values_of_list(self, images: list, device, dtype) -> torch.Tensor:
        """`[N, 3, H, W]` pixel values of per-query images, each prepared as it would be alone.

        A tensor is the pixel values of one image already (`[3, H, W]`, or `[1, 3, H, W]`); anything else (a PIL
        image, an array) goes through the image processor. A list may mix them: without this, a tensor next to a PIL
        image was preprocessed a second time (normalised twice). `check_inputs` / `encode_image` have made sure that
        every tensor is one image of the processor's output size.
        """
        runs = []  # consecutive items of one kind: [is_tensor, items]
        for item in images:
            is_tensor = isinstance(item, torch.Tensor)
            if is_tensor and item.ndim == 4:
                item = item[0]
            if runs and runs[-1][0] == is_tensor:
                runs[-1][1].append(item)
            else:
                runs.append([is_tensor, [item]])
        blocks = [
            (torch.stack(items) if is_tensor else processed_pixel_values(self.image_processor, items))
            for is_tensor, items in runs
        ]
        assert len({tuple(block.shape[1:]) for block in blocks}) == 1, [block.shape for block in blocks]
        return torch.cat(blocks).to(device=device, dtype=dtype)

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
        batch_size = check_positive_int(batch_size, "batch_size")
        data = {}
        images = self._check_images(images, "images", data)
        check_tensor_data(data)
        device = device or self._execution_device
        dtype = self.image_encoder.dtype
        chunks = range(0, len(images), batch_size)
        if show_progress:
            chunks = self.progress_bar(chunks)
        embeds = []
        for start in chunks:
            batch = load_image_paths(images[start : start + batch_size], "images", offset=start)
            pixel_values = self._pixel_values_of_list(batch, device, dtype)
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

        `mask_image` is what `check_inputs` let through: one mask, or one per query.
        Returns `(mask [batch, mask_size, mask_size], pixel_mask [batch, 1, H, W] or None)`; an all-zero mask stays zero.
        """
        size = self.transformer.config.mask_size
        masks = load_image_paths(image_list(mask_image, "mask_image"), "mask_image")
        assert len(masks) in (1, batch_size), (len(masks), batch_size)
        clip_size = clip_input_size(self.image_processor)
        pixel_mask = torch.cat([self._pixel_mask(item, clip_size) for item in masks])
        pixel_mask = (pixel_mask > 0.5).float().to(device)
        mask = F.interpolate(pixel_mask, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mask = (mask[:, 0] > 0.5).float()
        if mask.shape[0] != batch_size:  # one mask for every query: prepared once
            mask, pixel_mask = mask.expand(batch_size, -1, -1), pixel_mask.expand(batch_size, -1, -1, -1)
        return mask, pixel_mask

    def _pixel_mask(self, item, clip_size) -> torch.Tensor:
        """`[1, 1, H, W]` mask of one query at the CLIP input size (or as given without an image processor)."""
        if not isinstance(item, PIL.Image.Image):
            tensor = item.detach().float().cpu() if isinstance(item, torch.Tensor) else torch.as_tensor(np.asarray(item)).float()
            tensor = (tensor.reshape(tensor.shape[-2:]) > 0.5).float()  # [H, W] or [1, H, W]
            if self.image_processor is None or tuple(tensor.shape) == clip_size:
                return tensor[None, None]
            item = PIL.Image.fromarray(tensor.numpy().astype(np.uint8) * 255, mode="L")
        return self.image_processor(images=[item.convert("RGB")], do_normalize=False, return_tensors="pt").pixel_values[:, :1]

    # ------------------------------------------------------------------ checks

    def check_inputs(
        self,
        image,
        prompt,
        negative_prompt,
        mask_image,
        image_embeds,
        prompt_embeds,
        negative_prompt_embeds,
        mask,
        num_inference_steps,
        guidance_scale,
        image_guidance_scale,
        num_images_per_prompt,
        num_samples_per_query,
        source_weight,
        generator,
        latents,
        eta,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> int:
        """Check every argument once, before any file is read or tower runs, and return the number of queries.

        The steps of `__call__` trust what this lets through: shapes, counts, finite values (one check of every
        tensor argument, one host synchronisation), the scheduler's needs.
        """
        check_not_both("image", image, "image_embeds", image_embeds)
        check_not_both("mask_image", mask_image, "mask", mask, note=" (any size, binarised and resized)")
        check_positive_int(num_inference_steps, "num_inference_steps")
        check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        check_positive_int(num_samples_per_query, "num_samples_per_query")
        for name, scale in (("guidance_scale", guidance_scale), ("image_guidance_scale", image_guidance_scale)):
            check_float(scale, name, -GUIDANCE_SCALE_LIMIT, GUIDANCE_SCALE_LIMIT)
        check_float(source_weight, "source_weight", 0.0, 1.0)
        check_choice(output_type, "output_type", ("pt", "np", "latent"))
        for name in callback_on_step_end_tensor_inputs:
            check_choice(name, "callback_on_step_end_tensor_inputs", self._callback_tensor_inputs)
        self._check_scheduler(num_inference_steps, eta)

        sizes = self._check_texts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        data = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        if image_embeds is not None:
            if isinstance(image_embeds, torch.Tensor) and image_embeds.ndim == 3 and image_embeds.shape[1] == 1:
                image_embeds = image_embeds[:, 0]
            sizes["image_embeds"] = check_tensor(image_embeds, "image_embeds", ("batch", self.embedding_dim)).shape[0]
            data["image_embeds"] = image_embeds
        if image is not None:
            if self.image_encoder is None:
                raise ValueError("This pipeline has no `image_encoder`: pass `image_embeds` instead of `image`.")
            sizes["image"] = len(self._check_images(image, "image", data))
        if mask is not None:
            size = self.transformer.config.mask_size
            sizes["mask"] = check_tensor(mask, "mask", ("batch", size, size)).shape[0]
            data["mask"] = mask
        if mask_image is not None:
            masks = self._check_masks(mask_image, data)
            if not is_batch(mask_image, "mask_image"):  # a list of masks may make one query per mask
                sizes["mask_image"] = len(masks)
        # Every condition holds one entry per query, or a single one that serves every query (one reference image
        # with several modification texts, one text applied to several images, one negative text or mask).
        batch_size = check_batch_sizes(sizes)
        if mask_image is not None and is_batch(mask_image, "mask_image") and len(masks) != batch_size:
            raise ValueError(
                f"`mask_image` is a tensor/array of shape {shape_of(mask_image)}, a batch of {len(masks)} masks "
                f"[B, H, W], for {batch_size} quer{'y' if batch_size == 1 else 'ies'}: give one mask per query, or "
                "one mask for all as [H, W] or [1, H, W] (of a mask with channels, keep one: mask_image[0])."
            )

        rows = batch_size * num_images_per_prompt * num_samples_per_query
        check_generator(
            generator, rows,
            f"{batch_size} queries x {num_images_per_prompt} num_images_per_prompt x {num_samples_per_query} "
            "num_samples_per_query",
        )
        if latents is not None:
            if isinstance(latents, torch.Tensor) and latents.ndim == 3 and latents.shape[1] == 1:
                latents = latents[:, 0]
            data["latents"] = check_tensor(latents, "latents", (rows, self.embedding_dim))
        check_tensor_data(data)
        return batch_size

    def _check_texts(
        self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, with_negative: bool = True
    ) -> dict[str, int]:
        """The entries of each text condition; texts given as strings need the text tower, and both texts of a
        query must have one length. Without `with_negative` (no guidance) the negative text is not encoded."""
        if prompt is None and prompt_embeds is None:
            raise ValueError("A query needs a text: pass `prompt` or `prompt_embeds`.")
        check_not_both("prompt", prompt, "prompt_embeds", prompt_embeds)
        check_not_both("negative_prompt", negative_prompt, "negative_prompt_embeds", negative_prompt_embeds)
        sizes, lengths = {}, {}
        for name, texts in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if texts is not None:
                sizes[name] = len(check_texts(texts, name))
        # (encode_prompt may run on a pipeline holding only the text tower, as diffusers' tests build one)
        text_dim = self.transformer.config.text_embedding_dim if self.transformer is not None else "text_dim"
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None:
                sizes[name], lengths[name] = check_tensor(embeds, name, ("batch", "length", text_dim)).shape[:2]
        # the negative text defaults to "": it is encoded unless `negative_prompt_embeds` is given
        to_encode = prompt_embeds is None or (with_negative and negative_prompt_embeds is None)
        if to_encode and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError(
                "This pipeline has no `text_encoder`/`tokenizer`: pass `prompt_embeds` (and `negative_prompt_embeds`)."
            )
        encoded_length = self.text_conditioner.sequence_length if to_encode else None
        prompt_length = lengths.get("prompt_embeds", encoded_length)
        negative_length = lengths.get("negative_prompt_embeds", encoded_length)
        if with_negative and prompt_length != negative_length:
            raise ValueError(
                f"`prompt_embeds` ({prompt_length} tokens) and `negative_prompt_embeds` ({negative_length} tokens) "
                "must have the same length."
            )
        return sizes

    def _check_images(self, images, name: str, data: dict | None = None) -> list:
        """The per-query list of `images` (see `image_list`): image sources, or pixel values of the image encoder's
        input size; paths to existing files; an image processor for what is not pixel values yet. Tensors and
        arrays are added to `data` for the one check of their values."""
        items = image_list(images, name)
        check_image_paths(images, name)
        config = self.image_encoder.config
        pixels = (config.num_channels, config.image_size, config.image_size)
        listed = isinstance(images, (list, tuple))
        if isinstance(images, (torch.Tensor, np.ndarray)) and not listed:
            items_of = {(f"`{name}`", name): images}
        else:
            items_of = {(f"`{name}`[{index}]", f"{name}[{index}]"): item for index, item in enumerate(items)}
        for (where, key), item in items_of.items():
            if isinstance(item, torch.Tensor):
                shape = tuple(item.shape)
                if shape not in (pixels, (1, *pixels)) and not (len(shape) == 4 and shape[1:] == pixels and not listed):
                    one = "of one image " if listed else ""
                    raise ValueError(
                        f"{where} is a tensor of shape {shape}: pixel values {one}must be {pixels} (channels, height, "
                        f"width{', or a batch [N, ...] of them' if not listed else ''}), what the image encoder takes "
                        "and its image processor makes. Pass PIL images or file paths to have them prepared."
                    )
                check_float_pixels(item, where.strip("`"))
            elif isinstance(item, np.ndarray) and (item.size == 0 or min(item.shape[:2]) == 0):
                raise ValueError(f"{where} is an empty image (an array of shape {item.shape}).")
            elif not isinstance(item, np.ndarray) and not is_loadable_image(item):
                raise ValueError(
                    f"{where} is a {type(item).__name__}: an image is a PIL image, a file path or URL, encoded bytes, "
                    "a `datasets` image dict, an array or a pixel tensor."
                )
            if data is not None and isinstance(item, (torch.Tensor, np.ndarray)):
                data[key] = item
        if self.image_processor is None and not all(isinstance(item, torch.Tensor) for item in items):
            raise ValueError("This pipeline has no `image_processor`: pass preprocessed pixel values or `image_embeds`.")
        return items

    def _check_masks(self, mask_image, data: dict) -> list:
        """The per-query list of masks: `[H, W]` or `[1, H, W]` tensors/arrays or images (those need the image
        processor), of one size when there is no image processor to bring them to the CLIP input size."""
        masks = image_list(mask_image, "mask_image")
        check_image_paths(mask_image, "mask_image")
        shapes = set()
        for index, item in enumerate(masks):
            if not isinstance(item, (torch.Tensor, np.ndarray)):
                if self.image_processor is None:
                    raise ValueError("A PIL `mask_image` needs the pipeline's `image_processor`; pass a tensor instead.")
                continue
            shape = tuple(item.shape)
            if not (len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)) or 0 in shape:
                raise ValueError(
                    f"A tensor/array `mask_image` must be [H, W] or [1, H, W] per query (values in [0, 1]), "
                    f"got {shape} for query {index}."
                )
            shapes.add(shape[-2:])
            data[f"mask_image[{index}]"] = item
        if self.image_processor is None and len(shapes) > 1:
            raise ValueError(
                f"The `mask_image` masks have different sizes {sorted(shapes)}: without an `image_processor` to bring "
                "them to the CLIP input size, pass masks of one size."
            )
        return masks

    def _check_scheduler(self, num_inference_steps: int, eta) -> None:
        """What the scheduler needs: the reference grid's step range; x0 prediction without clipping for other
        schedulers; `eta` only where `step` takes it."""
        config = self.scheduler.config
        if isinstance(self.scheduler, CompoDiffScheduler):
            # the reference grid makes num_inference_steps - 1 network calls
            check_int(num_inference_steps, "num_inference_steps", 2, config.num_train_timesteps)
        else:
            if getattr(config, "prediction_type", "sample") != "sample":
                raise ValueError(
                    f"The CompoDiff denoiser predicts x0: configure {type(self.scheduler).__name__} with "
                    f"prediction_type='sample' (got {config.prediction_type!r})."
                )
            if getattr(config, "clip_sample", False):
                raise ValueError(
                    f"{type(self.scheduler).__name__} has clip_sample=True, which clips CLIP embeddings to [-1, 1]: "
                    "set clip_sample=False."
                )
        if eta is not None:
            # DDIM's noise is eta times the largest variance the update allows: beyond 1 its square root is NaN
            check_float(eta, "eta", 0.0, 1.0)
            if "eta" not in inspect.signature(self.scheduler.step).parameters:
                raise ValueError(f"{type(self.scheduler).__name__}.step takes no `eta`.")

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
        num_images_per_prompt: int = 1,
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
            prompt (`str` or `list[str]`): Modification texts ("as a pencil sketch"). Texts longer than the text
                encoder's 77 tokens are cut there, with one warning per call saying how many were cut.
            negative_prompt (`str` or `list[str]`, *optional*): What the result should not have. Defaults to `""`.
            mask_image (PIL image(s), image file path(s) or `[H, W]` tensors/arrays, *optional*): Region of the
                reference to change (white = 1): those pixels are zeroed before CLIP encoding and the mask conditions
                the denoiser. A mask is resized and cropped like the reference image, unless it is a tensor/array
                already at the CLIP input size (see `prepare_mask`). A `[B, H, W]` tensor is one mask per query and
                must match the queries the other arguments make; a single mask is `[H, W]` or `[1, H, W]`.
            image_embeds (`[B, D]`), prompt_embeds (`[B, L, text_dim]`), negative_prompt_embeds, mask
                (`[B, mask_size, mask_size]`), *optional*: Precomputed conditions instead of images/texts/masks
                (`encode_prompt` gives the two text embeddings). Every tensor argument (pixel values included) must be
                finite and hold data (not on the meta device): checked once per call, before any tower runs.
            num_inference_steps (`int`, defaults to 10): Steps of the sampler. With `CompoDiffScheduler` the
                reference grid makes `num_inference_steps - 1` network calls.
            guidance_scale (`float`, defaults to 7.5): Text guidance `w_text`, within +-1e4 (a larger magnitude is
                refused as a mistake: see `GUIDANCE_SCALE_LIMIT`).
            image_guidance_scale (`float`, defaults to 1.5): Image guidance `w_image`, within +-1e4.
                The guided prediction is `u + (c - n) * w_text + (n - u) * w_image`; with both at 1 it is the
                conditional prediction, and only that branch runs.
            num_samples_per_query (`int`, defaults to 1): Samples drawn per query and averaged into one embedding
                (less sampling noise).
            source_weight (`float` in [0, 1], defaults to 0.0): Mix `(1 - w) * result + w * reference embedding`
                (0.1 keeps more of the reference image; ignored for text-only queries).
            generator (`torch.Generator` or a list of `batch_size * num_images_per_prompt * num_samples_per_query`
                of them, *optional*): Makes the result deterministic; a list gives each row of noise (query-major,
                then image, then sample) its own generator.
            latents (`[B * num_images_per_prompt * num_samples_per_query, D]`, *optional*): Initial noise.
            eta (`float` in [0, 1], *optional*): Sampler stochasticity, for schedulers whose `step` takes it (DDIM's
                noise is `eta` times the largest the update allows: beyond 1 it has no meaning and gives NaN).
            normalize (`bool`, defaults to `False`): L2-normalise the output (what retrieval needs).
            output_type (`"pt"`, `"np"` or `"latent"`): `"latent"` returns the sampler's final state, one row per
                sample `[B * num_images_per_prompt * num_samples_per_query, D]` (float32), before averaging, mixing
                and normalising.
            return_dict (`bool`, defaults to `True`).
            callback_on_step_end (`Callable`, *optional*): Called as `callback(pipe, step, timestep, kwargs)` after
                every step; returns the `kwargs` dict (returning `None` is an error, not "no change": a forgotten
                `return` would drop the callback's work), where new `"latents"` replace the sample. It may change
                `pipe._guidance_scale` / `pipe._image_guidance_scale` for the next steps or set `pipe._interrupt`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): Tensors passed to the callback.
            num_images_per_prompt (`int`, defaults to 1): Separate embeddings per query (diffusers' convention): the
                output holds `B * num_images_per_prompt` rows, those of one query consecutive.

        Returns:
            [`CompoDiffPipelineOutput`] or a tuple `(image_embeds,)`.
        """
        # 0. Deprecated forms: `encode_prompt`'s result (now a tuple) passed where its old tensor was
        prompt_embeds = first_of_encode_prompt(prompt_embeds, "prompt_embeds")
        negative_prompt_embeds = first_of_encode_prompt(negative_prompt_embeds, "negative_prompt_embeds")

        # 1. Check inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        batch_size = self.check_inputs(
            image, prompt, negative_prompt, mask_image, image_embeds, prompt_embeds, negative_prompt_embeds, mask,
            num_inference_steps, guidance_scale, image_guidance_scale, num_images_per_prompt, num_samples_per_query,
            source_weight, generator, latents, eta, output_type, callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale, self._image_guidance_scale = guidance_scale, image_guidance_scale
        self._interrupt, self._num_timesteps = False, 0
        device = self._execution_device
        dtype = self.transformer.dtype  # the compute dtype, also under layerwise casting
        text_only = image is None and image_embeds is None

        # 2. Read image files (after the checks, before any tower runs)
        if image is not None:
            image = image_list(load_image_paths(image, "image"), "image")
        if mask_image is not None:
            mask_image = image_list(load_image_paths(mask_image, "mask_image"), "mask_image")

        # 3. Mask: binarised at the CLIP input size, resized to the denoiser's grid
        pixel_mask = None
        if mask_image is not None:
            mask, pixel_mask = self.prepare_mask(mask_image, batch_size, device)
        elif mask is None:
            mask = torch.zeros(1, self.transformer.config.mask_size, self.transformer.config.mask_size)
        mask = mask.to(device=device, dtype=dtype).expand(batch_size, -1, -1)

        # 4. Reference image embedding (a zero embedding for a text-only query)
        if image is not None:
            image_embeds = self._encode_reference(image, pixel_mask, len(mask_image or ()), device)
        elif image_embeds is None:
            image_embeds = torch.zeros(1, self.embedding_dim)
        image_embeds = image_embeds.reshape(image_embeds.shape[0], -1).to(device=device, dtype=dtype)
        if self.config.image_embeds_norm is not None:  # the scale the model was trained with
            image_embeds = F.normalize(image_embeds, dim=-1) * self.config.image_embeds_norm
        image_embeds = image_embeds.expand(batch_size, -1)

        # 5. Texts: the prompts and negative texts given as strings go through the text tower in one call
        prompt_embeds, negative_prompt_embeds = self._encode_prompt(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, True, device
        )
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).expand(batch_size, -1, -1)
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)

        # 6. Initial noise (query-major rows, then image, then sample: the reference's (b r) order), drawn in float32
        # whatever the model precision, so a seed gives the same query in every precision
        samples = num_images_per_prompt * num_samples_per_query  # rows of noise per query
        shape = (batch_size * samples, self.embedding_dim)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.reshape(shape).to(device=device, dtype=torch.float32)

        # 7. Denoise
        conditions = {"image_embeds": image_embeds, "prompt_embeds": prompt_embeds,
                      "negative_prompt_embeds": negative_prompt_embeds, "mask": mask}
        sample = self._sample_reference if isinstance(self.scheduler, CompoDiffScheduler) else self._sample_with_scheduler
        latents = sample(
            conditions, latents, num_inference_steps, samples, generator, eta, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )

        # 8. Average the samples of each image, mix in the source, normalise
        result = latents.float()
        if output_type != "latent":
            result = result.view(batch_size * num_images_per_prompt, num_samples_per_query, -1).mean(dim=1)
            source = None if text_only else image_embeds.float().repeat_interleave(num_images_per_prompt, dim=0)
            result = mix_and_normalize(result, source, source_weight, normalize)

        self.maybe_free_model_hooks()
        if output_type == "np":
            result = result.cpu().numpy()
        if not return_dict:
            return (result,)
        return CompoDiffPipelineOutput(image_embeds=result)

    def _encode_reference(self, images: list, pixel_mask, num_masks: int, device) -> torch.Tensor:
        """CLIP embeddings of the reference images, their masked pixels zeroed."""
        pixel_values = self._pixel_values_of_list(images, device, self.image_encoder.dtype)
        if pixel_mask is not None:
            if pixel_values.shape[0] == 1 and num_masks == 1:
                pixel_mask = pixel_mask[:1]  # one image, one mask: encode the masked image once
            if pixel_mask.shape[-2:] != pixel_values.shape[-2:]:
                pixel_mask = F.interpolate(pixel_mask, size=pixel_values.shape[-2:], mode="nearest")
            pixel_values = pixel_values * (1 - pixel_mask.to(pixel_values.dtype))
        return self.image_encoder(pixel_values=pixel_values).image_embeds

