"""Scene labels for the tiny vision towers, and a fast batch maker.

`scene_labels` gives the sign's word, the object count, the sign's side and the shape/colour/
size/column of objects[0] (the "main" object captions lead with). Tower pretraining
(`tower_targets`) uses only word, count and sign_side from those: nothing in a picture marks
objects[0], so it adds per-column shape/colour/size targets instead.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from vlmlab.sim.scene import Scene, render, sample_scene
from vlmlab.sim.streams import LABEL_STREAM, item_rng
from vlmlab.sim.vocab import COLORS, MAX_OBJECTS, POSITIONS, SHAPES, SIGN_SIDES, SIGN_WORDS, SIZES

NUM_CLASSES = {
    "word": len(SIGN_WORDS),
    "shape": len(SHAPES),          # of the main object
    "color": len(COLORS),
    "size": len(SIZES),
    "position": len(POSITIONS),
    "count": MAX_OBJECTS,          # count - 1
    "sign_side": len(SIGN_SIDES),
}


def scene_labels(scene: Scene) -> dict[str, int]:
    m = scene.main
    return {
        "word": SIGN_WORDS.index(scene.word),
        "shape": SHAPES.index(m.shape),
        "color": COLORS.index(m.color),
        "size": SIZES.index(m.size),
        "position": m.column,
        "count": scene.count - 1,
        "sign_side": SIGN_SIDES.index(scene.sign_side),
    }


def labelled_images(n: int, seed: int, size: int, render_size: int = 96) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n scenes as (images uint8 (n, size, size, 3), {label: int64 (n,)}).

    Rendered at `render_size` (the stored image size) and resized like the model's processor
    would, so a 32 px tower sees the same blur it will see in training. ~0.5 ms per image.
    """
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = {k: np.empty(n, dtype=np.int64) for k in NUM_CLASSES}
    for i, scene in enumerate(label_stream_scenes(n, seed)):
        images[i] = picture(scene, size, render_size)
        for k, v in scene_labels(scene).items():
            labels[k][i] = v
    return images, labels


def label_stream_scenes(n: int, seed: int):
    """The n scenes of the label stream (tower pretraining), in order."""
    return (sample_scene(item_rng(seed, LABEL_STREAM, i)) for i in range(n))


def picture(scene: Scene, size: int, render_size: int) -> np.ndarray:
    """uint8 (size, size, 3): rendered at `render_size`, then resized (bicubic) as a smaller view would be."""
    img = render(scene, render_size)
    return np.asarray(img if size == render_size else img.resize((size, size), Image.BICUBIC))


def tower_targets() -> dict[str, int]:
    """Classes per target of the tiny vision towers (the zoo's, the teacher's): the world's scene labels plus,
    for each picture column, the shape / colour / size of the object standing there (or "none"). Column
    targets name every object a caption mentions; `scene_labels` describes only objects[0], which no
    picture marks as main (its column is random), so its shape/colour cannot be read off the image."""
    targets = {k: n for k, n in NUM_CLASSES.items() if k in ("word", "count", "sign_side")}
    for col in POSITIONS:
        targets.update({f"shape_{col}": len(SHAPES) + 1, f"color_{col}": len(COLORS) + 1, f"size_{col}": len(SIZES) + 1})
    return targets


def labelled_scenes(n: int, seed: int, size: int, render_size: int = 96) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n scenes as (uint8 (n, size, size, 3), {target: int64 (n,)}), targets as `tower_targets`.

    The same scenes and pixels as `labelled_images(n, seed, size, render_size)` (same RNG stream, same
    rendering), with the column targets added."""
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    out = {k: np.zeros(n, dtype=np.int64) for k in tower_targets()}  # 0 = "none" for the column targets
    for i, scene in enumerate(label_stream_scenes(n, seed)):
        images[i] = picture(scene, size, render_size)
        base = scene_labels(scene)
        for k in ("word", "count", "sign_side"):
            out[k][i] = base[k]
        for obj in scene.objects:
            col = obj.position
            out[f"shape_{col}"][i] = 1 + SHAPES.index(obj.shape)
            out[f"color_{col}"][i] = 1 + COLORS.index(obj.color)
            out[f"size_{col}"][i] = 1 + SIZES.index(obj.size)
    return images, out
