"""Scene labels for the tiny vision towers, and a fast batch maker.

`scene_labels` gives the sign's word, the object count, the sign's side and the shape/colour/
size/column of objects[0] (the "main" object captions lead with). Tower pretraining
(`vlmlab.sim.pretrain.tower_targets`) uses only word, count and sign_side from here: nothing in
a picture marks objects[0], so zoo adds its own per-column shape/colour/size targets instead.
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
