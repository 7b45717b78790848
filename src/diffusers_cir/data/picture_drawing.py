# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Drawing the pictures of the built-in picture world (:mod:`diffusers_cir.data.pictures`) with PIL.

A picture shows one object (a shape) of one colour and one material, in one style, at one position. Every attribute
is visible in every combination: materials are surface patterns (wood grain, brushed metal bands, see-through glass,
stone speckles) that survive each style, styles change the background and the line work (a photo's gradient and
shadow, a cartoon's flat fill and black outline, a sketch's paper and hatching, a painting's canvas and soft edges),
and positions move the object by a fifth of the picture.

``draw_picture(attributes, size, rng)`` is deterministic given ``rng``: variant 0 of an item is its gallery picture,
other variants (another seed) jitter the size, offset, rotation and textures, which is what the encoders train on.
Everything is drawn at twice the size and downsampled, for smooth edges.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

COLOR_VALUES = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 30),
    "orange": (245, 125, 25),
    "purple": (135, 55, 185),
    "pink": (245, 125, 185),
    "cyan": (35, 195, 205),
}
OBJECT_NAMES = ("circle", "square", "triangle", "star", "heart", "diamond", "hexagon", "cross")
MATERIAL_NAMES = ("wooden", "metal", "glass", "stone")
STYLE_NAMES = ("photo", "cartoon", "sketch", "painting")
POSITION_CENTERS = {
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the middle",
}
_SUPERSAMPLE = 2


def _shape_points(name: str, center: tuple[float, float], radius: float, angle: float) -> list[tuple[float, float]]:
    """The outline of a shape as a polygon (a circle is a 48-gon), rotated by ``angle`` radians."""
    if name == "circle":
        corners = [(math.cos(2 * math.pi * k / 48), math.sin(2 * math.pi * k / 48)) for k in range(48)]
    elif name == "square":
        corners = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif name == "triangle":
        corners = [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)]
    elif name == "star":
        corners = [
            ((1.0 if k % 2 == 0 else 0.45) * math.sin(math.pi * k / 5), -(1.0 if k % 2 == 0 else 0.45) * math.cos(math.pi * k / 5))
            for k in range(10)
        ]
    elif name == "heart":
        corners = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            corners.append((x / 17.0, -y / 17.0 - 0.1))
    elif name == "diamond":
        corners = [(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)]
    elif name == "hexagon":
        corners = [(math.cos(math.pi * k / 3), math.sin(math.pi * k / 3)) for k in range(6)]
    elif name == "cross":
        a, b = 0.3, 0.9
        corners = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(f"Unknown object {name!r}; the picture world draws {', '.join(OBJECT_NAMES)}.")
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = center
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in corners]


def _shade(color, factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * factor)))) for c in color)


def _mix(color, other, weight: float) -> tuple[int, int, int]:
    return tuple(round(c * (1 - weight) + o * weight) for c, o in zip(color, other))


@lru_cache(maxsize=16)
def _background_base(style: str, size: int) -> np.ndarray:
    """The noiseless background of a style (float32 ``[size, size, 3]``), shared by every picture of that size."""
    if style == "photo":  # a soft grey-blue gradient, lighter at the top
        top, bottom = np.array([226, 232, 240], np.float32), np.array([168, 176, 190], np.float32)
        ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        return np.broadcast_to(top * (1 - ramp) + bottom * ramp, (size, size, 3)).copy()
    colors = {"cartoon": (252, 252, 252), "sketch": (246, 241, 226), "painting": (214, 190, 150)}
    if style not in colors:
        raise ValueError(f"Unknown style {style!r}; the picture world draws {', '.join(STYLE_NAMES)}.")
    return np.broadcast_to(np.array(colors[style], np.float32), (size, size, 3)).copy()


def _background(style: str, size: int, rng: np.random.Generator) -> Image.Image:
    pixels = _background_base(style, size)
    if style == "sketch":  # paper with a faint grain
        pixels = pixels + 4 * rng.standard_normal((size, size, 1), dtype=np.float32)
    elif style == "painting":  # canvas with brush-like streaks
        pixels = pixels + 10 * rng.standard_normal((size, 1, 1), dtype=np.float32)
        pixels += 6 * rng.standard_normal((size, size, 1), dtype=np.float32)
    return Image.fromarray(_to_uint8(pixels), "RGB")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(pixels, 0, 255, out=pixels if pixels.flags.writeable else None).astype(np.uint8)


def _material(material: str, color, background: Image.Image, box, rng: np.random.Generator) -> Image.Image:
    """The object's surface: a full-size RGB layer, pasted through the shape's mask."""
    size = background.size[0]
    left, top, right, bottom = box
    layer = Image.new("RGB", (size, size), color)
    draw = ImageDraw.Draw(layer)
    height = max(1.0, bottom - top)
    if material == "wooden":  # darker wavy grain lines across the object
        layer.paste(_shade(color, 0.92), (0, 0, size, size))
        spacing = height / 6
        phase = rng.uniform(0, 2 * math.pi)
        for row in range(8):
            y0 = top + spacing * (row - 0.5)
            points = [(x, y0 + 0.12 * height * math.sin(phase + x / height * 5)) for x in np.linspace(left, right, 24)]
            draw.line(points, fill=_shade(color, 0.5), width=max(2, int(height / 14)))
    elif material == "metal":  # bands of light and shade with a bright specular stripe
        rows = np.arange(size, dtype=np.float32)
        profile = 0.55 + 0.45 * np.abs(np.cos((rows - top) / height * math.pi * 1.5))
        shine = top + height * rng.uniform(0.25, 0.4)
        band = np.exp(-((rows - shine) ** 2) / (2 * (height / 16) ** 2))
        column = np.array(color, np.float32)[None, :] * (profile * (1 - band))[:, None] + 250 * band[:, None]
        layer = Image.fromarray(_to_uint8(np.repeat(column[:, None, :], size, axis=1)), "RGB")
    elif material == "glass":  # see-through: the background shows, tinted, with a white glint
        layer = Image.blend(background, Image.new("RGB", (size, size), color), 0.45)
        draw = ImageDraw.Draw(layer)
        glint = [(left + 0.25 * (right - left), top + 0.6 * height), (left + 0.55 * (right - left), top + 0.2 * height)]
        draw.line(glint, fill=(255, 255, 255), width=max(2, int(height / 10)))
    elif material == "stone":  # speckles of darker and lighter grains
        speckle = rng.random((size, size), dtype=np.float32)[:, :, None]
        base = np.array(color, np.float32)
        pixels = np.where(speckle < 0.16, base * 0.55, np.where(speckle > 0.88, base * 0.5 + 127, base))
        layer = Image.fromarray(pixels.astype(np.uint8), "RGB")
    else:
        raise ValueError(f"Unknown material {material!r}; the picture world draws {', '.join(MATERIAL_NAMES)}.")
    return layer


def draw_picture(
    attributes: dict[str, str], size: int = 64, rng: np.random.Generator | None = None, jitter: bool = False
) -> Image.Image:
    """One picture (RGB, ``size`` x ``size``) of an item with ``object``, ``color``, ``material``, ``style`` and
    ``position`` attributes. ``jitter`` varies size, offset and rotation (training variants); ``rng`` seeds the
    textures and the jitter."""
    rng = rng if rng is not None else np.random.default_rng(0)
    canvas = size * _SUPERSAMPLE
    style, color = attributes["style"], COLOR_VALUES[attributes["color"]]
    background = _background(style, canvas, rng)
    fx, fy = POSITION_CENTERS[attributes["position"]]
    radius = 0.21 * canvas
    angle = 0.0
    if jitter:
        fx += rng.uniform(-0.04, 0.04)
        fy += rng.uniform(-0.04, 0.04)
        radius *= rng.uniform(0.85, 1.12)
        angle = rng.uniform(-0.2, 0.2)
    points = _shape_points(attributes["object"], (fx * canvas, fy * canvas), radius, angle)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    box = (min(xs), min(ys), max(xs), max(ys))

    mask = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    if style == "photo":  # a soft shadow below and to the right
        small = canvas // 4  # blurred at a quarter of the size: the same soft shadow, 16 times cheaper
        shadow = Image.new("L", (small, small), 0)
        ImageDraw.Draw(shadow).polygon([((x + 0.04 * canvas) / 4, (y + 0.05 * canvas) / 4) for x, y in points], fill=110)
        shadow = shadow.filter(ImageFilter.GaussianBlur(0.025 * small)).resize((canvas, canvas), Image.Resampling.BILINEAR)
        background = Image.composite(Image.new("RGB", background.size, (60, 60, 70)), background, shadow)
    if style == "sketch":  # pencil colouring: lighter than the ink
        color = _mix(color, (246, 241, 226), 0.3)
    surface = _material(attributes["material"], color, background, box, rng)
    picture = Image.composite(surface, background, mask)
    draw = ImageDraw.Draw(picture)
    outline = max(2, canvas // 40)
    if style == "cartoon":
        draw.line(points + points[:1], fill=(20, 20, 20), width=2 * outline, joint="curve")
    elif style == "sketch":  # hatching over the object and a wobbly graphite outline
        hatch = Image.new("L", (canvas, canvas), 0)
        hatch_draw = ImageDraw.Draw(hatch)
        for offset in range(-canvas, canvas, max(4, canvas // 18)):
            hatch_draw.line([(offset, canvas), (offset + canvas, 0)], fill=120, width=1)
        hatch = ImageChops.multiply(hatch, mask)
        picture = Image.composite(Image.new("RGB", picture.size, (70, 70, 70)), picture, hatch)
        draw = ImageDraw.Draw(picture)
        wobble = [(x + rng.normal(0, 0.006 * canvas), y + rng.normal(0, 0.006 * canvas)) for x, y in points]
        draw.line(wobble + wobble[:1], fill=(55, 55, 55), width=outline)
    elif style == "painting":  # soft edges and visible brush texture
        picture = picture.filter(ImageFilter.GaussianBlur(0.012 * canvas))
        strokes = 9 * rng.standard_normal((canvas // 4, 1, canvas // 4, 1, 1), dtype=np.float32)
        texture = np.broadcast_to(strokes, (canvas // 4, 4, canvas // 4, 4, 1)).reshape(canvas, canvas, 1)
        picture = Image.fromarray(_to_uint8(np.asarray(picture, dtype=np.float32) + texture))
    elif style == "photo":
        draw.line(points + points[:1], fill=_shade(color, 0.7), width=max(1, outline // 2), joint="curve")
    return picture.reduce(_SUPERSAMPLE)
