"""`diffusers_cir.load_image`: every kind of image file becomes upright 8-bit RGB by value range."""

import io

import numpy as np
import PIL.Image
import pytest

from diffusers_cir import load_image


def _gradient(width=24, height=16):
    x = np.linspace(0, 1, width)[None, :] * np.ones((height, 1))
    return x


def test_exif_orientation_is_applied(tmp_path):
    upright = PIL.Image.fromarray((np.arange(6 * 4 * 3).reshape(4, 6, 3) * 3).astype(np.uint8))
    stored = upright.transpose(PIL.Image.Transpose.ROTATE_90)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "sideways.png", exif=exif.tobytes())
    loaded = load_image(tmp_path / "sideways.png")
    assert loaded.size == upright.size
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(upright))
    # a PIL image opened by the caller is turned too
    np.testing.assert_array_equal(np.asarray(load_image(PIL.Image.open(tmp_path / "sideways.png"))), np.asarray(upright))


def test_sixteen_bit_images_scale_by_range_not_clip(tmp_path):
    wide = (_gradient() * 65535).astype(np.uint16)
    PIL.Image.fromarray(wide).save(tmp_path / "wide.png")
    loaded = np.asarray(load_image(tmp_path / "wide.png"))
    expected = np.rint(wide / 257).astype(np.uint8)
    np.testing.assert_array_equal(loaded[..., 0], expected)
    assert (loaded == 255).mean() < 0.1  # clipping made almost every pixel white


def test_thirty_two_bit_int_and_float_images():
    as_int = PIL.Image.fromarray((_gradient() * 65535).astype(np.int32))
    assert as_int.mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(as_int))[..., 0], np.rint(_gradient() * 65535 / 257).astype(np.uint8))
    unit_float = PIL.Image.fromarray(_gradient().astype(np.float32))
    assert unit_float.mode == "F"
    np.testing.assert_array_equal(np.asarray(load_image(unit_float))[..., 0], np.rint(_gradient() * 255).astype(np.uint8))
    wide_float = PIL.Image.fromarray((_gradient() * 4000 - 1000).astype(np.float32))
    stretched = np.asarray(load_image(wide_float))[..., 0]
    assert stretched.min() == 0 and stretched.max() == 255
    with pytest.raises(ValueError, match="NaN"):
        load_image(np.full((4, 4), np.nan, dtype=np.float32))


def test_transparency_is_composited_over_white_for_images_and_black_for_masks():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2, :, :] = [10, 20, 30, 255]  # opaque top half, transparent bottom half (black underneath)
    image = PIL.Image.fromarray(rgba, mode="RGBA")
    rgb = np.asarray(load_image(image))
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[3, 0].tolist() == [255, 255, 255]
    mask = np.asarray(load_image(image, mode="L"))
    assert mask[3, 0] == 0 and mask.ndim == 2
    la = PIL.Image.fromarray(rgba[..., :2].copy(), mode="LA")
    assert np.asarray(load_image(la))[3, 0].tolist() == [255, 255, 255]
    palette = image.convert("P")
    assert load_image(palette).mode == "RGB"


def test_cmyk_bytes_dicts_and_arrays():
    cmyk = PIL.Image.new("CMYK", (5, 3), (0, 255, 255, 0))
    assert np.asarray(load_image(cmyk))[0, 0].tolist() == [255, 0, 0]
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (3, 2), (1, 2, 3)).save(buffer, format="PNG")
    assert np.asarray(load_image(buffer.getvalue()))[0, 0].tolist() == [1, 2, 3]
    assert np.asarray(load_image({"bytes": buffer.getvalue(), "path": None}))[0, 0].tolist() == [1, 2, 3]
    assert load_image(np.zeros((3, 5), dtype=bool)).size == (5, 3)


def test_errors_name_the_argument_and_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="`image` is the path"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"`images\[3\]`: '.*text.png' could not be read as an image"):
        load_image(tmp_path / "text.png", name="images[3]")
    with pytest.raises(ValueError, match="empty image"):
        load_image(PIL.Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match="must be a PIL image"):
        load_image(3.5)
    truncated = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(truncated, "PNG")
    with pytest.raises(ValueError, match="could not be read"):
        load_image(truncated.getvalue()[:200])
