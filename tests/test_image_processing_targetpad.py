"""TargetPadImageProcessor against an independent torchvision/PIL statement of CLIP4Cir's ``targetpad_transform``, on
its own, through the composition pipelines' and CaptionRewritePipeline's encode_image, and across save -> reload."""

import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_fusion import OPEN_CLIP_CONFIG, tiny_composition_pipeline, tiny_head, tiny_open_clip_parts

from diffusers_cir import AutoCIRPipeline, Clip4CirPipeline, TargetPadImageProcessor
from diffusers_cir.retrieval.image_processing_targetpad import image_processor_for

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 32
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# (width, height): below, at and above the 1.25 ratio, landscape and portrait, odd sides, square; 35 x 32 and its
# transpose keep their size and leave a crop offset of 1.5 (torchvision rounds it to 2, a floor would give 1).
SIZES = [(40, 36), (36, 40), (35, 32), (32, 35), (125, 100), (100, 125), (301, 100), (77, 193), (70, 55), (64, 64)]


def authors_targetpad(image, target_ratio=1.25, size=SIZE):
    """CLIP4Cir's TargetPad + targetpad_transform (ABaldrati/CLIP4Cir src/data_utils.py), restated with torchvision."""
    w, h = image.size
    if max(w, h) / min(w, h) >= target_ratio:
        scaled = max(w, h) / target_ratio
        hp, vp = max(int((scaled - w) / 2), 0), max(int((scaled - h) / 2), 0)
        image = TF.pad(image, [hp, vp, hp, vp], 0, "constant")
    transform = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                         lambda im: im.convert("RGB"), ToTensor(), Normalize(MEAN, STD)])
    return transform(image)


def noise_image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def processor(**kwargs):
    return TargetPadImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, **kwargs)


@pytest.mark.parametrize("width,height", SIZES)
def test_pixels_equal_the_authors_transform(width, height):
    image = noise_image(width, height)
    ours = processor()(image, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(ours, authors_targetpad(image), rtol=0, atol=1e-5)


def test_padding_arithmetic_truncates_and_pads_only_the_short_side():
    pad = processor().target_pad
    # 301 / 1.25 = 240.8; (240.8 - 100) / 2 = 70.4 -> 70 rows above and below; the long side keeps its 301.
    padded = pad(noise_image(301, 100))
    assert padded.size == (301, 240)
    pixels = np.asarray(padded)
    assert not pixels[:70].any() and not pixels[-70:].any() and pixels[70:170].any()
    assert pad(noise_image(100, 301)).size == (240, 301)  # portrait: left and right
    assert pad(noise_image(124, 100)).size == (124, 100)  # ratio 1.24 < 1.25: untouched
    assert pad(noise_image(125, 100)).size == (125, 100)  # exactly 1.25: padded by int(0 / 2) = 0
    assert processor(target_ratio=1.0).target_pad(noise_image(77, 193)).size == (193, 193)  # SquarePad
    assert processor(target_ratio=None).target_pad(noise_image(301, 100)).size == (301, 100)


def test_the_crop_offset_is_torchvisions_not_transformers_floor():
    from transformers import CLIPImageProcessorPil

    image = noise_image(35, 32)
    plain = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    expected = authors_targetpad(image)
    assert not torch.allclose(plain(image, return_tensors="pt").pixel_values[0], expected, atol=1e-3)
    torch.testing.assert_close(processor(target_ratio=None)(image, return_tensors="pt").pixel_values[0], expected,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [0.5, float("nan"), True, "1.25"])
def test_a_bad_target_ratio_is_refused(bad):
    with pytest.raises(ValueError, match="target_ratio"):
        processor(target_ratio=bad)


def test_only_a_shortest_side_resize_and_crop_processor_can_be_padded():
    from transformers import BlipImageProcessor

    with pytest.raises(ValueError, match="use 'clip' preprocessing"):
        image_processor_for(BlipImageProcessor(size={"height": 32, "width": 32}), "targetpad")
    padded = image_processor_for(processor(target_ratio=1.5), "targetpad")
    assert padded.target_ratio == 1.5  # the processor's own ratio is kept unless another is asked for
    assert image_processor_for(padded, "targetpad", 1.1).target_ratio == 1.1
    plain = image_processor_for(padded, "clip")
    assert not isinstance(plain, TargetPadImageProcessor) and plain.size == padded.size


def _images():
    return [noise_image(width, height, seed) for seed, (width, height) in enumerate(SIZES[3:8])]


def _expected_features(image_encoder, images):
    from diffusers_cir.pipelines import composition_encoders as encoders

    pixels = torch.stack([authors_targetpad(image) for image in images])
    with torch.no_grad():
        return encoders.image_features(image_encoder, pixels)


def test_a_clip_composition_pipeline_encodes_with_target_pad_and_keeps_it_when_saved(tmp_path):
    pipe = tiny_composition_pipeline()
    plain_fingerprint = pipe.fingerprint
    pipe.image_processor = image_processor_for(pipe.image_processor, "targetpad")
    assert pipe.fingerprint != plain_fingerprint
    images = _images()
    features = pipe.encode_image(images)
    torch.testing.assert_close(features, _expected_features(pipe.image_encoder, images), rtol=1e-5, atol=1e-5)

    pipe.save_pretrained(tmp_path)
    loaded = AutoCIRPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, TargetPadImageProcessor) and loaded.image_processor.target_ratio == 1.25
    assert loaded.fingerprint == pipe.fingerprint
    torch.testing.assert_close(loaded.encode_image(images), features, rtol=1e-5, atol=1e-5)
    # A query's reference goes through the same preprocessing as the gallery.
    query = loaded(image=images[0], prompt="is red").image_embeds
    from_embeds = loaded(image_embeds=features[:1], prompt="is red").image_embeds
    torch.testing.assert_close(query, from_embeds, rtol=1e-5, atol=1e-5)


def test_an_open_clip_tower_gets_target_pad_from_its_own_preprocessing():
    import open_clip

    from diffusers_cir.models._open_clip import open_clip_image_processor

    model = open_clip.CLIP(**OPEN_CLIP_CONFIG)
    parts = tiny_open_clip_parts()
    parts["image_processor"] = image_processor_for(open_clip_image_processor(model), "targetpad")
    pipe = Clip4CirPipeline(fusion_head=tiny_head(), **parts)
    pipe.set_progress_bar_config(disable=True)
    images = _images()
    torch.testing.assert_close(pipe.encode_image(images), _expected_features(pipe.image_encoder, images),
                               rtol=1e-5, atol=1e-5)


def test_caption_rewrite_pipeline_encodes_its_gallery_with_target_pad(tmp_path):
    from tiny_mllm import tiny_caption_rewrite_pipeline

    pipe = tiny_caption_rewrite_pipeline("cirevl-cirr")
    pipe.image_processor = image_processor_for(pipe.image_processor, "targetpad")
    images = _images()
    pixels = torch.stack([authors_targetpad(image) for image in images])
    with torch.no_grad():
        expected = pipe.image_encoder(pixel_values=pixels).image_embeds
    torch.testing.assert_close(pipe.encode_image(images), expected, rtol=1e-5, atol=1e-5)
    pipe.save_pretrained(tmp_path)
    assert isinstance(AutoCIRPipeline.from_pretrained(tmp_path).image_processor, TargetPadImageProcessor)
