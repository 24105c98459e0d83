"""The blind control: does a model read its images?

Every benchmark is scored again with each image replaced by one blank image of the CLIP mean
colour (what MGM's pad fills with, so both towers see a uniform field). A metric that scores
the same blind as seeing (paired bootstrap over the same items: seeing - blind, interval
containing 0) is answered from the question and the language prior alone, and a difference
between runs on it is not about what the models saw.
"""
from __future__ import annotations

from PIL import Image

from vlmlab.evaluate import items
from vlmlab.evaluate.bootstrap import Statistic, contrast, point


def blank_images(processor) -> None:
    """From now on every image the processor reads is one uniform image of its mean colour (CLIP's), at its size."""
    seeing = processor.images
    fill = tuple(round(255 * c) for c in processor.image_mean)
    processor.images = lambda image: seeing(Image.new("RGB", (processor.image_size_aux,) * 2, fill))


def seeing_minus_blind(seen: dict[str, Statistic], unseen: dict[str, Statistic], samples: int, seed: int,
                       level: float) -> dict[str, float]:
    """Flat metrics per headline metric m: m_blind, and the paired difference m_minus_blind with its interval."""
    out = {}
    for metric in seen:
        pair = items.align({"seeing": seen, "blind": unseen}, metric)
        ci = contrast(pair, {"seeing": 1.0, "blind": -1.0}, items.resample_counts_for(pair, samples, seed), level)
        out[f"{metric}_blind"] = point(unseen[metric])
        out[f"{metric}_minus_blind"] = ci.value
        out[f"{metric}_minus_blind_ci_low"], out[f"{metric}_minus_blind_ci_high"] = ci.ci_low, ci.ci_high
    return out

