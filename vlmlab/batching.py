"""Padding variable-length id sequences into a batch: the one place every batch maker pads.

Training pads on the right, generation on the left (so every prompt ends where decoding starts).
"""
from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100  # label of every token the loss skips (transformers' and torch's cross-entropy default)


def pad(rows: Sequence[Sequence[int] | torch.Tensor], value: int, side: str = "right", length: int | None = None,
        multiple_of: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id rows -> (ids, mask), both long (len(rows), T): T = `length`, else the longest row rounded
    up to `multiple_of`; pads with `value` on `side`; mask is 1 on the rows' own tokens."""
    if side not in ("left", "right"):
        raise ValueError(f"side {side!r}: use left or right")
    T = length if length is not None else max((len(r) for r in rows), default=0)
    if multiple_of:
        T = -(-T // multiple_of) * multiple_of
    ids = torch.full((len(rows), T), value, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        at = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, at] = torch.as_tensor(r, dtype=torch.long)
        mask[i, at] = 1
    return ids, mask
