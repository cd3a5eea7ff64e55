"""Drawing synthetic scenes with PIL.

Each object is drawn through a binary mask (PIL polygons and ellipses without
anti-aliasing, so output pixels depend only on the scene and the image size). Textures
alternate the object's colour with a contrast colour (black on light colours, white on
dark ones, see :func:`contrast_colour`) in a pattern anchored at the object's bounding box:

* solid: the object colour only;
* striped: horizontal bands ``u`` pixels high;
* dotted: ``u x u`` contrast dots every ``3u`` pixels, offset by ``u`` (object colour elsewhere);
* checked: a checkerboard of ``u x u`` squares;

with ``u = max(1, size // 32)`` (2 pixels at the default 64 x 64).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from specs_metric.synth.world import COLOURS, GRID, SIZE_RADIUS, Scene, SceneObject


def contrast_colour(colour: str, background: str) -> tuple[int, int, int]:
    """The texture's second colour: black on light colours, white on dark ones.

    Light means Rec. 601 luma above 140. When that colour is the background's, the other
    of black and white is used, and mid gray when that one is the object's own colour.
    """
    r, g, b = COLOURS[colour]
    black, white, gray = (0, 0, 0), (255, 255, 255), (128, 128, 128)
    order = [black, white] if 0.299 * r + 0.587 * g + 0.114 * b > 140 else [white, black]
    taken = {COLOURS[colour], COLOURS[background]}
    return next(c for c in [*order, gray] if c not in taken)


def _regular_polygon(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple]:
    angles = [phase + 2 * math.pi * i / n for i in range(n)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def _shape_mask(obj: SceneObject, size: int) -> Image.Image:
    """Binary ("L", 0/255) mask of the object on a ``size x size`` canvas."""
    cell = size / GRID
    cx = (obj.column + 0.5) * cell
    cy = (obj.row + 0.5) * cell
    r = SIZE_RADIUS[obj.size] * cell
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = obj.shape
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = 0.5 * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + 0.15 * r, r, 3, -math.pi / 2), fill=255)
    elif shape == "diamond":
        draw.polygon(_regular_polygon(cx, cy, r, 4, -math.pi / 2), fill=255)
    elif shape == "heart":
        lobe = 0.5 * r
        for dx in (-lobe, lobe):
            draw.ellipse((cx + dx - lobe, cy - r, cx + dx + lobe, cy - r + 2 * lobe), fill=255)
        draw.polygon([(cx - r, cy - 0.5 * lobe), (cx + r, cy - 0.5 * lobe), (cx, cy + r)], fill=255)
    elif shape == "star":
        outer = _regular_polygon(cx, cy, r, 5, -math.pi / 2)
        inner = _regular_polygon(cx, cy, 0.42 * r, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=255)
    elif shape == "cross":
        t = 0.33 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _texture(texture: str, height: int, width: int, unit: int) -> np.ndarray:
    """Boolean (height, width) array: True where the contrast colour shows."""
    y, x = np.mgrid[0:height, 0:width]
    if texture == "solid":
        return np.zeros((height, width), dtype=bool)
    if texture == "striped":
        return (y // unit) % 2 == 1
    if texture == "dotted":
        return ((y % (3 * unit)) // unit == 1) & ((x % (3 * unit)) // unit == 1)
    if texture == "checked":
        return ((y // unit) + (x // unit)) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}")


def render_scene(scene: Scene, size: int = 64) -> Image.Image:
    """RGB image of the scene, ``size x size`` pixels."""
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = COLOURS[scene.background]
    unit = max(1, size // 32)
    for obj in scene.objects:
        mask = np.asarray(_shape_mask(obj, size)) > 0
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        top, left = rows[0], cols[0]
        pattern = np.zeros((size, size), dtype=bool)
        pattern[top:, left:] = _texture(obj.texture, size - top, size - left, unit)
        pixels[mask & ~pattern] = COLOURS[obj.colour]
        pixels[mask & pattern] = contrast_colour(obj.colour, scene.background)
    return Image.fromarray(pixels)
