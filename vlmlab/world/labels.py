"""Scene labels for the tiny vision towers, and a fast batch maker.

`scene_labels` gives the sign's word, the object count, the sign's side and the shape/colour/
size/column of objects[0] (the "main" object captions lead with). Tower pretraining
(`vlmlab.models.zoo.tower_targets`) uses only word, count and sign_side from here: nothing in
a picture marks objects[0], so zoo adds its own per-column shape/colour/size targets instead.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from vlmlab.world.scene import Scene, render, sample_scene
from vlmlab.world.vocab import COLORS, MAX_OBJECTS, POSITIONS, SHAPES, SIGN_SIDES, SIGN_WORDS, SIZES

NUM_CLASSES = {
    "word": len(SIGN_WORDS),
    "shape": len(SHAPES),          # of the main object
    "color": len(COLORS),
    "size": len(SIZES),
    "position": len(POSITIONS),
    "count": MAX_OBJECTS,          # count - 1
    "sign_side": len(SIGN_SIDES),
}
LABEL_STREAM = 7   # RNG stream id of tower-pretraining scenes: disjoint from prepare's splits


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
    for i in range(n):
        scene = sample_scene(np.random.default_rng([seed, LABEL_STREAM, i]))
        img = render(scene, render_size)
        if size != render_size:
            img = img.resize((size, size), Image.BICUBIC)
        images[i] = np.asarray(img)
        for k, v in scene_labels(scene).items():
            labels[k][i] = v
    return images, labels
