"""The tiny world's RNG stream scheme, in one place.

Every item draws from its own numpy Generator seeded with (seed, stream, index[, sub-stream]), so
an item does not depend on worker scheduling or on how many items came before it, and no two
uses share a stream: each split of `prepare` has its own (held-out eval scenes are never drawn
from a training split's stream), as do the LM's text corpus and the towers' labelled scenes.
"""
from __future__ import annotations

import numpy as np

# split -> (RNG stream id, first id). Ids are 9 digits, like the challenge's, unique across splits.
SPLITS = {
    "raw": (0, 0),
    "curated": (1, 10_000_000),
    "instruct": (2, 20_000_000),
    "eval_textvqa": (3, 90_000_000),
    "eval_caption": (4, 91_000_000),
    "eval_mmbench": (5, 92_000_000),
}
CORPUS_STREAM = 6   # world_text_corpus (LM pretraining)
LABEL_STREAM = 7    # labelled scenes for tower pretraining


def item_rng(seed: int, stream: int, index: int, *sub: int) -> np.random.Generator:
    """The Generator of one item of one stream (`sub`: a further stream of that item)."""
    return np.random.default_rng([seed, stream, index, *sub])


def split_rng(seed: int, split: str, index: int, *sub: int) -> np.random.Generator:
    return item_rng(seed, SPLITS[split][0], index, *sub)


def item_id(split: str, index: int) -> str:
    return f"{SPLITS[split][1] + index:09d}"


def item_index(split: str, sample_id: str) -> int:
    """Inverse of `item_id`: the index within its split of an id that split made."""
    return int(sample_id) - SPLITS[split][1]
