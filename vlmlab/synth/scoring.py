"""How good is the teacher: its captions vs the noisy seed-style captions, against the same references.

Held-out images are the world's caption eval set (5 dense references each). The teacher's captions
are made the way Data-Juicer makes them (sampled with its generation config, 128 new tokens at most);
a greedy caption is scored too. The "raw" baseline is what the seed set would say about those very
images: the world's web-style alt-text for each eval scene (same noise rate as the seed set).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlmlab import io
from vlmlab.evaluate.captions import caption_scores
from vlmlab.synth.teacher import caption_images


def read_eval_captions(path: str | Path, limit: int = 0) -> tuple[list[dict], list[Image.Image]]:
    """Rows {"id", "image", "captions"} of captions.jsonl and their images (paths relative to its folder)."""
    path = Path(path)
    if not path.is_file():
        raise io.fail(f"{path}: no caption references; run `dvc repro prepare` or set the eval path")
    rows = io.read_jsonl(path)[: limit or None]
    images = []
    for r in rows:
        with Image.open(path.parent / r["image"]) as im:
            images.append(im.convert("RGB"))
    return rows, images


def raw_style_captions(rows: list[dict], seed: int, noise_rate: float) -> dict[str, str]:
    """The seed set's kind of caption for each eval image: the world's web caption of the same scene.

    The eval scene is re-drawn from the world's own stream for that item (vlmlab.world.generate), the
    alt-text from a separate stream, so the references are untouched.
    """
    from vlmlab.world.generate import SPLITS
    from vlmlab.world.scene import sample_scene
    from vlmlab.world.text import web_caption

    stream, first = SPLITS["eval_caption"]
    out = {}
    for r in rows:
        index = int(r["id"]) - first
        scene = sample_scene(np.random.default_rng([seed, stream, index]))
        out[r["id"]] = web_caption(scene, np.random.default_rng([seed, stream, index, 1]), noise_rate)
    return out


def score_teacher(model, processor, rows: list[dict], images: list[Image.Image], raw: dict[str, str] | None,
                  batch_size: int) -> tuple[dict, dict[str, str]]:
    """Metrics {teacher_sampled, teacher_greedy, raw_captions: {bleu_4, cider, ...}} and the sampled captions."""
    refs = {r["id"]: r["captions"] for r in rows}
    ids = [r["id"] for r in rows]
    sampled = dict(zip(ids, caption_images(model, processor, images, batch_size, do_sample=True)))
    greedy = dict(zip(ids, caption_images(model, processor, images, batch_size, do_sample=False)))
    metrics = {"teacher_sampled": caption_scores(sampled, refs), "teacher_greedy": caption_scores(greedy, refs)}
    if raw is not None:
        metrics["raw_captions"] = caption_scores(raw, refs)
    return metrics, sampled
