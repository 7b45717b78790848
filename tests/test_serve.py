"""``diffusers-cir serve`` without a browser: the search behind the page, the mask drawn in the editor, the index
backend and the command line (the browser test is tests/test_serve_browser.py)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_cir.cli import main
from diffusers_cir.retrieval import load_image

pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from diffusers_cir.demo.serve import picture_world_backend

    return picture_world_backend("tiny", work_dir=tmp_path_factory.mktemp("serve"), show_progress=False)


def test_the_drawn_layer_is_the_mask_and_the_background_the_reference():
    from diffusers_cir.demo.serve import _split_editor

    background = Image.new("RGBA", (64, 64), (10, 200, 10, 255))
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (8, 8, 24, 40))
    reference, mask = _split_editor({"background": background, "layers": [layer], "composite": background})
    assert reference.mode == "RGB" and reference.getpixel((0, 0)) == (10, 200, 10)
    drawn = np.asarray(mask) > 0
    assert mask.mode == "L" and drawn[8:40, 8:24].all() and drawn.sum() == 16 * 32
    empty = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert _split_editor({"background": background, "layers": [empty]})[1] is None
    assert _split_editor(None) == (None, None)


def test_a_gallery_picture_is_left_out_of_its_own_results(backend):
    name = next(iter(backend.models))
    picture = load_image(backend.examples[0])
    hits, excluded = backend.search(name, picture, "make it blue", k=5)
    reference_id = Path(backend.examples[0]).stem  # the gallery file is named after its id
    assert len(hits) == 5 and excluded == [reference_id] and reference_id not in [hit.id for hit in hits]
    assert f"the gallery picture {reference_id}, left out" in backend.describe_reference(picture)
    changed = picture.copy()
    changed.putpixel((0, 0), tuple(255 - value for value in picture.getpixel((0, 0))))
    assert "not a gallery picture" in backend.describe_reference(changed)
    assert backend.search(name, changed, "make it blue", k=5)[1] == []
    kept, excluded = backend.search(name, picture, "make it blue", k=len(backend.index), exclude_reference=False)
    assert excluded == [] and reference_id in [hit.id for hit in kept]


def test_settings_reach_the_pipeline_and_change_the_query(backend):
    name = next(iter(backend.models))
    picture = load_image(backend.examples[0])
    plain = backend.search(name, picture, "paint it green", k=10)[0]
    again = backend.search(name, picture, "paint it green", k=10)[0]
    guided = backend.search(name, picture, "paint it green", k=10, settings={"guidance_scale": 12.0})[0]
    assert [h.score for h in plain] == [h.score for h in again]  # seeded: the same query twice
    assert [h.score for h in plain] != [h.score for h in guided]


def test_search_refuses_what_it_cannot_run(backend):
    name = next(iter(backend.models))
    with pytest.raises(ValueError, match="Type a modification text"):
        backend.search(name, None, "  ")
    with pytest.raises(ValueError, match="Unknown model 'nope'"):
        backend.search("nope", None, "make it red")


def test_sliders_follow_the_models_call_parameters(backend):
    from diffusers_cir.demo.serve import SLIDERS

    model = next(iter(backend.models.values()))
    defaults = model.setting_defaults()
    assert set(defaults) == set(SLIDERS) & model.parameters == {"guidance_scale", "image_guidance_scale",
                                                                 "num_inference_steps"}
    assert all(value is not None for value in defaults.values())


def test_index_backend_serves_a_saved_index_and_refuses_a_model_of_another_gallery(backend, tmp_path):
    from tiny_components import tiny_pipeline

    from diffusers_cir.demo import SHIPPED_PIPELINE
    from diffusers_cir.demo.serve import index_backend

    index_dir = next(p for p in (Path(backend.examples[0]).parents[1]).glob("index-*/index"))
    served = index_backend(index_dir, [str(SHIPPED_PIPELINE)])
    hits, _ = served.search(next(iter(served.models)), load_image(backend.examples[0]), "make it red", k=3)
    assert [hit.id for hit in hits][:1] and all(hit.id.startswith("picture-") for hit in hits)
    tiny_pipeline().save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="(?i)gallery|fingerprint|model"):
        index_backend(index_dir, [str(tmp_path / "other")])


@pytest.mark.parametrize("argv, message", [
    (["serve", "--model", "m"], "--model searches an index: give the index with --index"),
    (["serve", "--index", "i", "--world", "tiny"], "--pipeline and --world choose the built-in picture world"),
    (["serve", "--port", "70000"], "--port must be in 1-65535"),
])
def test_serve_command_line_refusals(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_page_builds(backend):
    import gradio as gr

    from diffusers_cir.demo.serve import build_app

    app = build_app(backend)
    assert isinstance(app, gr.Blocks)
    ids = {block.elem_id for block in app.blocks.values() if getattr(block, "elem_id", None)}
    assert {"reference", "text", "negative-text", "model", "guidance-scale", "search", "results", "ranking", "reference-note"} <= ids

