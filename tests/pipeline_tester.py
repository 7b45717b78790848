"""The pipeline contract, tested on every registered CIR pipeline (in the spirit of diffusers' PipelineTesterMixin).

A test class per pipeline derives from :class:`CIRPipelineTesterMixin` and says how to build the pipeline with tiny
components (`get_pipeline`) and what an extra query argument it needs is (`query_kwargs`, e.g. a generator).
`test_pipeline_contract.py` checks that every class in the registry has such a test class.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from diffusers_cir import AutoCIRPipeline, load_image


def picture(seed: int, size: tuple[int, int] = (40, 48)) -> PIL.Image.Image:
    """A deterministic RGB picture with structure (so that rotation and scaling change its embedding)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(base).resize(size, PIL.Image.NEAREST)
    pixels = np.asarray(image).copy()
    pixels[: size[1] // 3, : size[0] // 4] = [250, 20, 20]  # an asymmetric block: rotations are told apart
    return PIL.Image.fromarray(pixels)


def exif_rotated_twin(image: PIL.Image.Image, path) -> None:
    """Save ``image`` as a JPEG stored sideways with EXIF orientation 6 (view = rotate 90 degrees clockwise)."""
    stored = image.transpose(PIL.Image.Transpose.ROTATE_90)  # counter-clockwise: the camera's raw sensor layout
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", quality=100, subsampling=0, exif=exif.tobytes())


def cosine(a, b) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a).float(), torch.as_tensor(b).float(), dim=-1)


class CIRPipelineTesterMixin:
    pipeline_class: type = None

    def get_pipeline(self):
        """The pipeline with tiny components, image encoder included, on CPU, progress bars off."""
        raise NotImplementedError

    def query_kwargs(self) -> dict:
        """Extra arguments every query call needs (a seeded generator for a sampling pipeline)."""
        return {}

    # ---------------------------------------------------------------------------------------------- the contract

    def test_is_registered(self):
        from diffusers_cir.pipelines import PIPELINES

        assert PIPELINES[self.pipeline_class.__name__] is self.pipeline_class
        assert type(self.get_pipeline()) is self.pipeline_class

    def test_query_embeds_are_batch_by_embedding_dim(self):
        pipe = self.get_pipeline()
        output = pipe(image=[picture(0), picture(1)], prompt=["is red", "has two dogs"], **self.query_kwargs())
        assert tuple(output.image_embeds.shape) == (2, pipe.embedding_dim)
        assert torch.isfinite(torch.as_tensor(output.image_embeds)).all()
        single = pipe(image=picture(0), prompt="is red", **self.query_kwargs()).image_embeds
        assert tuple(single.shape) == (1, pipe.embedding_dim)
        as_numpy = pipe(image=picture(0), prompt="is red", output_type="np", **self.query_kwargs()).image_embeds
        assert isinstance(as_numpy, np.ndarray)
        torch.testing.assert_close(torch.from_numpy(as_numpy), single.float().cpu(), atol=1e-5, rtol=0)

    def test_encode_image_is_gallery_by_embedding_dim_and_reads_every_source(self, tmp_path):
        pipe = self.get_pipeline()
        images = [picture(2), picture(3), picture(4)]
        gallery = pipe.encode_image(images)
        assert tuple(gallery.shape) == (3, pipe.embedding_dim)
        images[1].save(tmp_path / "second.png")
        images[2].save(tmp_path / "third.png")
        from_sources = pipe.encode_image([images[0], str(tmp_path / "second.png"), (tmp_path / "third.png").read_bytes()])
        torch.testing.assert_close(from_sources.float(), gallery.float(), atol=1e-5, rtol=0)

    def test_exif_rotated_jpeg_embeds_like_its_upright_twin(self, tmp_path):
        pipe = self.get_pipeline()
        upright = picture(5, size=(48, 40))
        exif_rotated_twin(upright, tmp_path / "sideways.jpg")
        upright_jpeg = tmp_path / "upright.jpg"
        load_image(tmp_path / "sideways.jpg").save(upright_jpeg, format="JPEG", quality=100, subsampling=0)
        # The rotation is lossless only on whole JPEG blocks; compare with the decoded, turned pixels themselves.
        turned = load_image(tmp_path / "sideways.jpg")
        embeds = pipe.encode_image([str(tmp_path / "sideways.jpg"), turned, PIL.Image.open(tmp_path / "sideways.jpg")])
        assert cosine(embeds[0], embeds[1]) >= 0.9999
        assert cosine(embeds[2], embeds[1]) >= 0.9999
        query = pipe(image=str(tmp_path / "sideways.jpg"), prompt="is red", **self.query_kwargs()).image_embeds
        query_upright = pipe(image=turned, prompt="is red", **self.query_kwargs()).image_embeds
        assert cosine(query, query_upright) >= 0.9999

    def test_16_bit_png_embeds_like_its_8_bit_rendering(self, tmp_path):
        pipe = self.get_pipeline()
        eight = np.asarray(picture(6).convert("L")).astype(np.uint16)
        wide = eight * 257 + np.random.default_rng(0).integers(0, 200, size=eight.shape).astype(np.uint16)
        PIL.Image.fromarray(wide).save(tmp_path / "wide.png")
        assert PIL.Image.open(tmp_path / "wide.png").mode.startswith("I")
        rendering = PIL.Image.fromarray(np.rint(wide / 257).astype(np.uint8)).convert("RGB")
        embeds = pipe.encode_image([str(tmp_path / "wide.png"), rendering])
        assert cosine(embeds[0], embeds[1]) >= 0.999

    def test_fingerprint_follows_the_gallery_side(self, tmp_path):
        pipe = self.get_pipeline()
        fingerprint = pipe.fingerprint
        assert isinstance(fingerprint, str) and len(fingerprint) >= 16
        assert pipe.fingerprint == fingerprint
        before = pipe.encode_image([picture(7)])
        gallery_module = next(
            getattr(pipe, name) for name in pipe._gallery_components if isinstance(getattr(pipe, name, None), torch.nn.Module)
        )
        with torch.no_grad():
            parameter = next(gallery_module.parameters())
            parameter.add_(0.05 * torch.randn_like(parameter))
        assert not torch.allclose(pipe.encode_image([picture(7)]).float(), before.float())
        assert pipe.fingerprint != fingerprint

    def test_a_clip_tower_gallery_side_embeds_as_the_bare_tower(self):
        """`index build` embeds the gallery of a pipeline whose gallery side is exactly `image_encoder` +
        `image_processor` (a CLIPVisionModelWithProjection) with that tower alone, under the same fingerprint."""
        from transformers import CLIPVisionModelWithProjection

        from diffusers_cir.retrieval import CLIPVisionEncoder

        pipe = self.get_pipeline()
        if tuple(pipe._gallery_components) != CLIPVisionEncoder._gallery_components or not isinstance(
            pipe.image_encoder, CLIPVisionModelWithProjection
        ):
            return  # its gallery side is more than a CLIP tower: index build loads the whole pipeline
        tower = CLIPVisionEncoder(pipe.image_encoder, pipe.image_processor)
        assert tower.fingerprint == pipe.fingerprint and tower.embedding_dim == pipe.embedding_dim
        images = [picture(10), picture(11)]
        assert (cosine(tower.encode_image(images), pipe.encode_image(images)) >= 0.9999).all()

    def test_saved_folder_reloads_through_auto_pipeline(self, tmp_path):
        pipe = self.get_pipeline()
        pipe.save_pretrained(tmp_path / "saved")
        loaded = AutoCIRPipeline.from_pretrained(tmp_path / "saved")
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is self.pipeline_class
        card = (tmp_path / "saved" / "README.md").read_text()  # every saved folder has a model card
        assert "library_name: diffusers-cir" in card and f"`{self.pipeline_class.__name__}`" in card
        assert loaded.fingerprint == pipe.fingerprint
        assert loaded.embedding_dim == pipe.embedding_dim
        query = dict(image=picture(8), prompt="has two dogs")
        torch.testing.assert_close(
            loaded(**query, **self.query_kwargs()).image_embeds.float(),
            pipe(**query, **self.query_kwargs()).image_embeds.float(), atol=1e-5, rtol=0,
        )

    def test_reference_given_as_its_gallery_embedding_composes_the_same_query(self):
        pipe = self.get_pipeline()
        if "image_embeds" not in pipe.call_parameters():
            return  # this pipeline composes from pixels only; retrieval passes it the images
        reference = picture(9)
        from_pixels = pipe(image=reference, prompt="is red", **self.query_kwargs()).image_embeds
        from_embeds = pipe(image_embeds=pipe.encode_image([reference]), prompt="is red", **self.query_kwargs()).image_embeds
        torch.testing.assert_close(from_embeds.float(), from_pixels.float(), atol=1e-5, rtol=0)

    def test_a_prompt_that_is_not_text_is_refused_by_name(self):
        import pytest

        pipe = self.get_pipeline()
        with pytest.raises(ValueError, match="prompt"):
            pipe(image=picture(0), prompt=3, **self.query_kwargs())

    # ------------------------------------------------------------------------- diffusers' conventions, where they apply
    # What users of diffusers pipelines rely on (diffusers' own PipelineTesterMixin checks them on its pipelines); each
    # check applies to the pipelines whose call takes the arguments or holds the components it is about.

    def _needs(self, pipe, *names):
        import pytest

        missing = sorted(set(names) - pipe.call_parameters())
        if missing:
            pytest.skip(f"{type(pipe).__name__} takes no {', '.join(missing)}")

    def test_num_images_per_prompt_gives_separate_rows_per_query(self):
        pipe = self.get_pipeline()
        self._needs(pipe, "num_images_per_prompt")
        for batch in (1, 2):
            for count in (1, 2):
                output = pipe(image=[picture(i) for i in range(batch)], prompt=["is red", "has two dogs"][:batch],
                              num_images_per_prompt=count, **self.query_kwargs()).image_embeds
                assert tuple(output.shape) == (batch * count, pipe.embedding_dim)
        # the images of one query are the rows that as many copies of the query give (query-major, same seed)
        rows = pipe(image=picture(0), prompt="is red", num_images_per_prompt=3, **self.query_kwargs()).image_embeds
        copies = pipe(image=[picture(0)] * 3, prompt=["is red"] * 3, **self.query_kwargs()).image_embeds
        torch.testing.assert_close(rows.float(), copies.float(), atol=1e-5, rtol=0)
        if getattr(pipe, "scheduler", None) is not None:  # sampled: separate draws, not one row repeated
            assert not torch.allclose(rows[0].float(), rows[1].float())

    def test_step_callback_changes_guidance_and_can_interrupt(self):
        pipe = self.get_pipeline()
        self._needs(pipe, "callback_on_step_end", "guidance_scale")
        query = dict(image=picture(0), prompt="is red", guidance_scale=2.0)

        def raise_guidance(pipe, step, timestep, callback_kwargs):
            pipe._guidance_scale += 1.0
            return callback_kwargs

        raised = pipe(**query, callback_on_step_end=raise_guidance, **self.query_kwargs()).image_embeds
        assert pipe.num_timesteps > 1 and pipe.guidance_scale == 2.0 + pipe.num_timesteps
        assert isinstance(pipe.do_classifier_free_guidance, bool) and pipe.interrupt is False
        constant = pipe(**query, **self.query_kwargs()).image_embeds
        assert not torch.allclose(raised.float(), constant.float())  # the loop read the new scale

        steps = []

        def stop(pipe, step, timestep, callback_kwargs):
            steps.append(step)
            pipe._interrupt = True
            return callback_kwargs

        stopped = pipe(**query, callback_on_step_end=stop, **self.query_kwargs()).image_embeds
        assert steps == [0] and pipe.interrupt and torch.isfinite(torch.as_tensor(stopped)).all()

    def test_guidance_of_one_runs_the_conditional_branch_alone(self):
        pipe = self.get_pipeline()
        self._needs(pipe, "guidance_scale")
        unguided = {"guidance_scale": 1.0}
        if "image_guidance_scale" in pipe.call_parameters():
            unguided["image_guidance_scale"] = 1.0
        output = pipe(image=picture(0), prompt="is red", **unguided, **self.query_kwargs()).image_embeds
        assert pipe.do_classifier_free_guidance is False and torch.isfinite(torch.as_tensor(output)).all()

    def test_callback_tensor_inputs_and_latent_output(self):
        pipe = self.get_pipeline()
        self._needs(pipe, "callback_on_step_end", "callback_on_step_end_tensor_inputs", "output_type")
        names = list(pipe._callback_tensor_inputs)
        query = dict(image=picture(0), prompt="is red", callback_on_step_end_tensor_inputs=names, output_type="latent")

        def only_the_asked_ones(pipe, step, timestep, callback_kwargs):
            assert sorted(callback_kwargs) == sorted(names)
            return callback_kwargs

        latent = pipe(**query, callback_on_step_end=only_the_asked_ones, **self.query_kwargs()).image_embeds
        assert isinstance(latent, torch.Tensor) and latent.shape[0] >= 1

        def zero_at_the_last_step(pipe, step, timestep, callback_kwargs):
            if step == pipe.num_timesteps - 1:
                callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
            return callback_kwargs

        zeroed = pipe(**query, callback_on_step_end=zero_at_the_last_step, **self.query_kwargs()).image_embeds
        assert zeroed.abs().sum() == 0

    def test_scheduler_swap_keeps_what_the_model_needs(self):
        import pytest

        pipe = self.get_pipeline()
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None or not scheduler.compatibles:
            pytest.skip(f"{type(pipe).__name__} has no scheduler with compatible classes")
        original = dict(scheduler.config)
        for scheduler_class in scheduler.compatibles:
            pipe.scheduler = scheduler_class.from_config(original)  # diffusers' scheduler-swap idiom
            for key in ("prediction_type", "beta_schedule", "clip_sample"):
                if key in original and key in pipe.scheduler.config:
                    assert pipe.scheduler.config[key] == original[key], (scheduler_class.__name__, key)
            first = pipe(image=picture(0), prompt="is red", **self.query_kwargs()).image_embeds
            second = pipe(image=picture(0), prompt="is red", **self.query_kwargs()).image_embeds
            assert tuple(first.shape) == (1, pipe.embedding_dim) and torch.isfinite(first).all()
            torch.testing.assert_close(first, second, atol=0, rtol=0)

    def test_layerwise_casting_of_every_diffusers_model(self):
        import pytest
        from diffusers import ModelMixin

        pipe = self.get_pipeline()
        models = [name for name, component in pipe.components.items() if isinstance(component, ModelMixin)]
        if not models:
            pytest.skip(f"{type(pipe).__name__} holds no diffusers model")
        pipe.to(dtype=torch.bfloat16)
        for name in models:
            getattr(pipe, name).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        output = pipe(image=picture(0), prompt="is red", **self.query_kwargs()).image_embeds
        assert tuple(output.shape) == (1, pipe.embedding_dim) and torch.isfinite(torch.as_tensor(output).float()).all()

    def test_encode_prompt_returns_both_text_embeddings_and_they_compose_the_same_query(self):
        import inspect

        import pytest

        pipe = self.get_pipeline()
        if not hasattr(pipe, "encode_prompt"):
            pytest.skip(f"{type(pipe).__name__} has no encode_prompt")
        self._needs(pipe, "prompt_embeds", "negative_prompt_embeds", "negative_prompt")
        assert "negative_prompt" in inspect.signature(pipe.encode_prompt).parameters
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt("is red", negative_prompt="blurry")
        query = dict(image=picture(0), **self.query_kwargs())
        expected = pipe(prompt="is red", negative_prompt="blurry", **query).image_embeds
        query = dict(image=picture(0), **self.query_kwargs())
        got = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, **query).image_embeds
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-5, rtol=0)
        optional = set(getattr(pipe, "_optional_components", ()))
        if {"text_encoder", "tokenizer"} <= optional:  # the embeddings serve a pipeline without the text tower
            without = type(pipe)(**{**pipe.components, "text_encoder": None, "tokenizer": None})
            without.set_progress_bar_config(disable=True)
            query = dict(image=picture(0), **self.query_kwargs())
            got = without(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, **query).image_embeds
            torch.testing.assert_close(got.float(), expected.float(), atol=1e-5, rtol=0)
