"""The hostile-input cases of issue 20 against EVERY registered pipeline (the contract tests' tiny components), not
only the ones they were found on: each case ends in an error raised by diffusers_cir that names the argument, or in
the correct result; never in a crash deep inside torch / transformers, a NaN embedding, a query count other than
asked, or a prompt cut without a word.

Pipelines are taken from tests/test_pipeline_contract.py, so a new registered pipeline is tried here too. Pipelines
that take no pixel tensors (they tile and resize images themselves) refuse every tensor case by name, which is the
clear error these cases ask for.
"""

import inspect
import logging
import re
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_pipeline_contract as contract  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TESTERS = {name[len("Test"): -len("PipelineContract")]: cls for name, cls in vars(contract).items()
           if name.startswith("Test") and hasattr(cls, "get_pipeline")}
PACKAGE = str(Path(__import__("diffusers_cir").__file__).parent)
NAN, INF = float("nan"), float("inf")


def _picture(size=(40, 36), seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


class _Pipe:
    """A tiny pipeline and how its contract test calls it (seeded generators for the diffusion ones)."""

    def __init__(self, tester):
        self.tester = tester
        self.pipe = tester.get_pipeline()
        self.parameters = self.pipe.call_parameters()

    def __call__(self, **kwargs):
        arguments = self.tester.query_kwargs() if hasattr(self.tester, "query_kwargs") else {}
        arguments.update(kwargs)  # the case's value wins over the contract test's (e.g. num_inference_steps)
        return self.pipe(**arguments).image_embeds

    @property
    def pixels(self) -> int:
        """The image encoder's input size (the tiny towers' 30 or 32)."""
        encoder = getattr(self.pipe, "image_encoder", None)
        config = getattr(encoder, "config", None)
        size = getattr(getattr(config, "vision_config", config), "image_size", None)
        return size if isinstance(size, int) else 32


@pytest.fixture(scope="module", params=sorted(TESTERS))
def pipe(request):
    return _Pipe(TESTERS[request.param]())


def _refused(call, argument: str, match: str = ""):
    """`call` raises a ValueError/TypeError from diffusers_cir code whose message names `argument` (and `match`)."""
    with pytest.raises((ValueError, TypeError)) as error:
        call()
    message = str(error.value)
    assert f"`{argument}" in message, message
    if match:
        assert any(part.lower() in message.lower() for part in match.split("|")), message
    # Raised by the package's own checks, not by a library deep below (the last frame is ours).
    assert str(error.traceback[-1].path).startswith(PACKAGE), (error.traceback[-1].path, message)
    return message


# ------------------------------------------------------------------------------------------------ pixel inputs

PIXEL_CASES = {
    "NaN pixel tensor": lambda n: torch.full((1, 3, n, n), NAN),
    "inf pixel tensor": lambda n: torch.full((1, 3, n, n), INF),
    "half-precision NaN pixels": lambda n: torch.full((1, 3, n, n), NAN, dtype=torch.float16),
    "one NaN among finite pixels": lambda n: torch.rand(2, 3, n, n).index_put_((torch.tensor(1),) * 4, torch.tensor(NAN)),
    "meta-device pixels": lambda n: torch.empty(1, 3, n, n, device="meta"),
    "uint8 pixels (raw, not preprocessed)": lambda n: torch.randint(0, 255, (1, 3, n, n), dtype=torch.uint8),
    "1-channel pixel tensor": lambda n: torch.rand(1, 1, n, n),
    "wrong-size pixel tensor": lambda n: torch.rand(1, 3, 2 * n, 2 * n),
    "empty pixel batch": lambda n: torch.rand(0, 3, n, n),
    "NaN float array": lambda n: np.full((n, n, 3), np.nan, dtype=np.float32),
    "0x0 image": lambda n: PIL.Image.new("RGB", (0, 0)),
    "0-row array": lambda n: np.zeros((0, 5, 3), dtype=np.uint8),
    "empty list": lambda n: [],
    "None in a list": lambda n: [_picture(), None],
    "missing file": lambda n: "/nonexistent/picture.png",
    "a folder": lambda n: str(Path(__file__).parent),
    "a text file": lambda n: __file__,
}
PIXEL_MESSAGES = "must be a PIL image|finite|meta device|uint8|shape|empty|not an image|NoneType|no file|could not be read|pixel tensors|holds no"


@pytest.mark.parametrize("case", sorted(PIXEL_CASES))
def test_a_bad_reference_image_is_refused_by_name(pipe, case):
    image = PIXEL_CASES[case](pipe.pixels)
    _refused(lambda: pipe(image=image, prompt="make it red"), "image", PIXEL_MESSAGES)


@pytest.mark.parametrize("case", ["NaN pixel tensor", "meta-device pixels", "uint8 pixels (raw, not preprocessed)",
                                  "wrong-size pixel tensor", "0x0 image", "empty list", "a text file"])
def test_a_bad_gallery_image_is_refused_by_name(pipe, case):
    images = PIXEL_CASES[case](pipe.pixels)
    _refused(lambda: pipe.pipe.encode_image(images if case != "0x0 image" else [images]), "images", PIXEL_MESSAGES)


def test_a_well_formed_call_gives_finite_embeddings_one_per_query(pipe):
    out = pipe(image=[_picture(seed=1), _picture(seed=2)], prompt=["make it red", "as a sketch"])
    assert out.shape == (2, pipe.pipe.embedding_dim) and torch.isfinite(torch.as_tensor(out)).all()


# ------------------------------------------------------------------------------------------------ texts and batches

@pytest.mark.parametrize("prompt", [5, [], ["a", None], b"bytes"], ids=["int", "empty list", "None in list", "bytes"])
def test_a_prompt_that_is_not_text_is_refused_by_name(pipe, prompt):
    _refused(lambda: pipe(image=_picture(), prompt=prompt), "prompt")


def test_mismatched_batches_are_refused_not_broadcast(pipe):
    with pytest.raises(ValueError, match=r"2.*3|3.*2") as error:
        pipe(image=[_picture(), _picture(seed=3)], prompt=["a", "b", "c"])
    assert str(error.traceback[-1].path).startswith(PACKAGE)


def test_a_prompt_past_the_text_tower_is_reported_or_read_whole(pipe, caplog):
    """A 300-word prompt: either one warning naming how many prompts were cut and the limit, or an embedding that
    differs from the one of its first 75 words (it was read whole). Never the silent cut issue 20 found."""
    words = [f"word{index}" for index in range(300)]
    with caplog.at_level(logging.WARNING):
        long = pipe(image=_picture(), prompt=" ".join(words))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "longer than" in r.getMessage()]
    if warnings:
        assert len(warnings) == 1, warnings
        # how many were cut, and the limit (CLIP's 77 tokens, or the text tower's own positions)
        assert re.search(r"^1 of (the )?\d+ .*longer than (the )?\d+ tokens", warnings[0]), warnings[0]
    else:
        cut = pipe(image=_picture(), prompt=" ".join(words[:75]))
        assert not torch.allclose(torch.as_tensor(long), torch.as_tensor(cut), atol=1e-6)
    assert torch.isfinite(torch.as_tensor(long)).all()


# ------------------------------------------------------------------------------------------------ embeddings, masks

def _needs(pipe, name):
    if name not in pipe.parameters:
        pytest.skip(f"{type(pipe.pipe).__name__} takes no `{name}`")


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_image_embeds_are_refused_by_name(pipe, value):
    _needs(pipe, "image_embeds")
    embeds = torch.randn(2, pipe.pipe.embedding_dim)
    embeds[1, 3] = value
    _refused(lambda: pipe(image_embeds=embeds, prompt="make it red"), "image_embeds", "finite")


@pytest.mark.parametrize("shape", [(1, 1), (3,), (1, 2, 3), (0, None)], ids=["width 1", "1-d", "3-d", "no rows"])
def test_image_embeds_of_another_shape_are_refused_by_name(pipe, shape):
    _needs(pipe, "image_embeds")
    shape = tuple(pipe.pipe.embedding_dim if size is None else size for size in shape)
    _refused(lambda: pipe(image_embeds=torch.randn(*shape), prompt="make it red"), "image_embeds", "shape|rows|no ")


def test_a_batch_of_masks_does_not_multiply_one_query(pipe):
    _needs(pipe, "mask_image")
    n = pipe.pixels
    try:
        out = pipe(image=_picture(), prompt="make it red", mask_image=torch.zeros(3, n, n))
    except ValueError as error:
        assert "`mask_image`" in str(error)
    else:
        assert out.shape[0] == 1, out.shape


# ------------------------------------------------------------------------------------------------ scalar arguments

SCALARS = ("guidance_scale", "image_guidance_scale", "source_weight", "eta", "num_inference_steps", "batch_size")
ABSURD = {"nan": NAN, "inf": INF, "1e30": 1e30, "-1": -1.0}


def test_non_finite_or_absurd_scalars_are_refused_by_name(pipe):
    """Every scalar knob the pipeline's call takes, set to NaN, inf, 1e30 and -1 (a negative guidance scale aside:
    it is a valid, if unusual, extrapolation)."""
    taken = [name for name in SCALARS if name in inspect.signature(pipe.pipe.__call__).parameters]
    assert taken, "every pipeline takes a batch size or a step count"
    for name in taken:
        for label, value in ABSURD.items():
            if name.endswith("guidance_scale") and label == "-1":
                continue
            _refused(lambda: pipe(image=_picture(), prompt="make it red", **{name: value}), name)
