"""A scene: up to three coloured shapes in three columns and a sign with a word on it.

`sample_scene(rng)` draws one from a numpy Generator; `render(scene, size)` paints it with
PIL. Geometry is stored as fractions of the side, so one scene renders at any size; the
sign's font is FONT_FRACTION = 0.11 of the side (an 11 px font at 96 px, 4 px at 32 px).
The sign sits centred on one cell of a SIGN_GRID x SIGN_GRID grid, the tiny model's image-token
grid: a word the LM is to copy must lie in one image token, because the projector maps tokens one
by one. With the centre drawn freely across a cell boundary the text straddled two tokens in 74 %
of scenes and no token carried the word (probe 0.26, bench/image_token_probe.py); centred, the
token under the sign carries it (1.0) and the tiny study sees its stage-1 data
(bench/results/world_sign_on_patch_exploration.json).
Measured over 50 scenes (rng seeds 0-49): at 96 px the letters are near-black and span 6-10
rows (median 8), legible; at 32 px, rendered directly or resized from 96 px as the low-res
tower sees it, no letter pixel is darker than about 100/255 grey: a blur.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlmlab.sim.vocab import COLOR_RGB, COLORS, MAX_OBJECTS, POSITIONS, SHAPES, SIGN_SIDES, SIGN_WORDS, SIZES

RADIUS = {"small": 0.075, "large": 0.13}   # shape half-extent, fraction of the side
FONT_FRACTION = 0.11                       # letter size / image side
SIGN_BAND = 0.22                           # height of the sign's band (top or bottom)
SIGN_GRID = 4                              # image tokens a side: the tiny ViT's 32 px / 8 px patches


@dataclass(frozen=True)
class Shape:
    shape: str      # one of SHAPES
    color: str      # one of COLORS
    size: str       # one of SIZES
    column: int     # 0..2 -> POSITIONS (left, middle, right)
    x: float        # centre, fraction of the side
    y: float

    @property
    def position(self) -> str:
        return POSITIONS[self.column]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]   # objects[0] is the main object (captions lead with it)
    word: str                    # the sign's word, one of SIGN_WORDS
    sign_side: str               # top | bottom
    sign_x: float                # sign centre, fraction of the side
    background: tuple[int, int, int]

    @property
    def count(self) -> int:
        return len(self.objects)

    @property
    def main(self) -> Shape:
        return self.objects[0]

    @property
    def sign_centre(self) -> tuple[float, float]:
        """(x, y) of the sign's centre, fractions of the side."""
        return self.sign_x, (SIGN_BAND / 2 if self.sign_side == "top" else 1 - SIGN_BAND / 2)


def sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    columns = rng.permutation(3)[:n]
    sign_side = SIGN_SIDES[int(rng.integers(2))]
    # shapes live in the band the sign leaves free
    y_lo, y_hi = (SIGN_BAND, 1.0) if sign_side == "top" else (0.0, 1.0 - SIGN_BAND)
    objects = []
    for col in columns:
        size = SIZES[int(rng.integers(2))]
        r = RADIUS[size]
        x = (col + 0.5) / 3 + rng.uniform(-0.04, 0.04)
        y = rng.uniform(y_lo + r + 0.03, y_hi - r - 0.03)
        objects.append(Shape(SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))],
                             size, int(col), float(x), float(y)))
    grey = int(rng.integers(200, 245))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    return Scene(tuple(objects), SIGN_WORDS[int(rng.integers(len(SIGN_WORDS)))], sign_side,
                 _cell_centre(float(rng.uniform(0.35, 0.65))), background)


def _cell_centre(x: float) -> float:
    """The centre of the grid column that holds x: 0.375 or 0.625 for x in [0.35, 0.65]."""
    column = min(SIGN_GRID - 1, int(x * SIGN_GRID))
    return (column + 0.5) / SIGN_GRID


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont:
    # Pillow's embedded font: no font file on disk to go missing; pinned Pillow => same pixels
    return ImageFont.load_default(size=px)


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, side: int) -> None:
    cx, cy, r = s.x * side, s.y * side, RADIUS[s.size] * side
    fill = COLOR_RGB[s.color]
    if s.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif s.shape == "square":
        q = r * 0.88
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
    elif s.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif s.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {s.shape!r}")


def render(scene: Scene, size: int) -> Image.Image:
    """Paint `scene` as a size x size RGB image."""
    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_shape(draw, obj, size)
    font = _font(max(4, round(FONT_FRACTION * size)))
    left, top, right, bottom = draw.textbbox((0, 0), scene.word, font=font)
    tw, th = right - left, bottom - top
    pad = max(1, size // 32)
    cx, cy = (v * size for v in scene.sign_centre)
    box = (cx - tw / 2 - 2 * pad, cy - th / 2 - pad, cx + tw / 2 + 2 * pad, cy + th / 2 + pad)
    draw.rectangle(box, fill=(250, 250, 245), outline=(60, 60, 60))
    draw.text((cx - tw / 2 - left, cy - th / 2 - top), scene.word, fill=(15, 15, 15), font=font)
    return img
