"""Gallery encoders: one interface (the gallery side of the pipeline contract), one loader, one fingerprint; indexes
and gallery caches of the older 16-character fingerprint keep serving the model that made them."""

import hashlib
import json

import numpy as np
import pytest
import torch
from pipeline_tester import picture
from tiny_components import tiny_image_encoder, tiny_image_processor, tiny_pipeline

from diffusers_cir import AutoCIRPipeline, CompoDiffPipeline
from diffusers_cir.cli import main
from diffusers_cir.evaluation import IdHashEncoder
from diffusers_cir.retrieval import (
    CLIPVisionEncoder,
    GalleryEncoder,
    IndexMismatchError,
    composed_search,
    encode_gallery,
    load_gallery_encoder,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    tiny_pipeline().save_pretrained(root / "pipeline")
    tiny_image_encoder().save_pretrained(root / "tower")  # the pipeline's tower, on its own
    tiny_image_processor().save_pretrained(root / "tower")
    tiny_image_encoder(seed=1).save_pretrained(root / "other-tower")
    tiny_image_processor().save_pretrained(root / "other-tower")
    images = root / "images"
    images.mkdir()
    for number in range(6):
        picture(40 + number).save(images / f"{number}.png")
    return root


def test_every_gallery_encoder_meets_one_interface(folders):
    pipe = AutoCIRPipeline.from_pretrained(folders / "pipeline")
    for encoder in (pipe, load_gallery_encoder(folders / "tower"), IdHashEncoder(8)):
        assert isinstance(encoder, GalleryEncoder)


def test_a_pipeline_and_its_bare_tower_share_a_fingerprint_and_embeddings(folders):
    pipe = AutoCIRPipeline.from_pretrained(folders / "pipeline")
    tower = load_gallery_encoder(folders / "tower")
    from_pipeline_folder = load_gallery_encoder(folders / "pipeline")
    # The pipeline folder's gallery side is its CLIP tower: only that is loaded (the denoiser stays on disk).
    assert type(from_pipeline_folder) is CLIPVisionEncoder and type(tower) is CLIPVisionEncoder
    assert pipe.fingerprint == tower.fingerprint == from_pipeline_folder.fingerprint
    assert load_gallery_encoder(folders / "other-tower").fingerprint != pipe.fingerprint
    images = [str(path) for path in sorted((folders / "images").iterdir())]
    torch.testing.assert_close(tower.encode_image(images, batch_size=4), pipe.encode_image(images), atol=1e-5, rtol=0)


def test_a_pipeline_whose_gallery_side_is_more_than_a_tower_is_loaded_whole(folders, monkeypatch):
    monkeypatch.setattr(CompoDiffPipeline, "_gallery_components", ("image_encoder", "image_processor", "transformer"))
    assert type(load_gallery_encoder(folders / "pipeline")) is CompoDiffPipeline


def test_folders_that_cannot_embed_a_gallery_are_refused_by_name(tmp_path):
    tiny_pipeline(with_encoders=False).save_pretrained(tmp_path / "no-tower")
    with pytest.raises(ValueError, match="has no `image_encoder`: it cannot embed gallery images"):
        load_gallery_encoder(tmp_path / "no-tower")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="matches no released layout(.|\n)*a CLIP vision model folder"):
        load_gallery_encoder(tmp_path / "empty")


def test_index_build_from_a_bare_tower_serves_the_pipeline_and_refuses_another(folders, tmp_path, capsys):
    for tower in ("tower", "other-tower"):
        assert main(["index", "build", "--images", str(folders / "images"), "--model", str(folders / tower),
                     "--output", str(tmp_path / tower), "--num-workers", "0", "--device", "cpu"]) == 0
    pipe = tiny_pipeline()
    result = composed_search(pipe, tmp_path / "tower", image=folders / "images" / "1.png", text="is red", k=3,
                             num_inference_steps=2)
    assert len(result.hits) == 3 and "1.png" not in [hit.id for hit in result.hits]
    with pytest.raises(IndexMismatchError, match="not comparable"):
        composed_search(pipe, tmp_path / "other-tower", image=folders / "images" / "1.png", text="is red")


def _legacy(weight: torch.Tensor) -> str:
    """diffusers-cir 0.1.0.dev0's fingerprint, written out independently of the library."""
    values = weight.detach().to(torch.float16).numpy()
    digest = hashlib.sha256(json.dumps(list(values.shape)).encode())
    digest.update(values.tobytes())
    return digest.hexdigest()[:16]


def test_an_index_with_the_older_fingerprint_keeps_serving_its_model(folders, tmp_path):
    """Indexes built before `pipe.fingerprint` recorded 16 hex characters of the tower's projection: they are matched
    the way they were built (same projection: served; another: refused), not rejected wholesale."""
    assert main(["index", "build", "--images", str(folders / "images"), "--model", str(folders / "pipeline"),
                 "--output", str(tmp_path / "index"), "--num-workers", "0", "--device", "cpu"]) == 0
    pipe = tiny_pipeline()
    legacy = _legacy(pipe.image_encoder.visual_projection.weight)
    manifest_path = tmp_path / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["fingerprint"] = legacy
    del manifest["checksums"]  # nor content checksums, then
    (tmp_path / "index" / "checksums.json").unlink()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="without content checksums"):
        result = composed_search(pipe, tmp_path / "index", image=folders / "images" / "0.png", text="x", k=2,
                                 num_inference_steps=2)
    assert len(result.hits) == 2
    other = tiny_pipeline()
    other.image_encoder = tiny_image_encoder(seed=1)
    with pytest.raises(IndexMismatchError, match=f"fingerprint {legacy}"):
        composed_search(other, tmp_path / "index", image=folders / "images" / "0.png", text="x")

    # An embeddings folder of the older format resumes too (its finished parts are kept).
    parts = tmp_path / "index" / "embeddings"
    gallery_manifest = json.loads((parts / "gallery.json").read_text())
    gallery_manifest["model"]["fingerprint"] = legacy
    (parts / "gallery.json").write_text(json.dumps(gallery_manifest))
    tower = load_gallery_encoder(folders / "pipeline")
    calls = []
    original = tower.encode_image
    tower.encode_image = lambda images, **kwargs: calls.append(len(images)) or original(images, **kwargs)
    resumed = encode_gallery(tower, folders / "images", parts, show_progress=False)
    assert calls == [] and resumed.model_fingerprint == pipe.fingerprint
    with pytest.raises(ValueError, match="different gallery, part size or model"):
        gallery_manifest["model"]["fingerprint"] = _legacy(other.image_encoder.visual_projection.weight)
        (parts / "gallery.json").write_text(json.dumps(gallery_manifest))
        encode_gallery(tower, folders / "images", parts, show_progress=False)


def test_a_gallery_of_items_with_crop_boxes(tmp_path):
    from diffusers_cir.retrieval import GalleryItem

    image = picture(50, size=(64, 48))
    image.save(tmp_path / "scene.png")
    tower = CLIPVisionEncoder(tiny_image_encoder(), tiny_image_processor())
    items = [GalleryItem("whole", path=str(tmp_path / "scene.png")),
             GalleryItem("left", path=str(tmp_path / "scene.png"), crop_box=(0, 0, 20, 30))]
    gallery = encode_gallery(tower, items, tmp_path / "emb", show_progress=False)
    embeddings, ids, metadata = gallery.part(0)
    assert ids == ["whole", "left"] and metadata[1]["crop_box"] == [0, 0, 20, 30]
    expected = tower.encode_image([image, image.crop((0, 0, 20, 30))])
    np.testing.assert_allclose(gallery.embeddings_of(["left", "whole"]), expected.numpy()[::-1], atol=1e-5)
    with pytest.raises(ValueError, match=r"holds no embedding of \['nope'\]"):
        gallery.embeddings_of(["nope"])
