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
