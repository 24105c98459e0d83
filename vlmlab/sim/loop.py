"""The one small training loop of the simulator's tiny pretraining (LM, ViT, ConvNeXt, BLIP-2 teacher).

Plain AdamW with grad-norm clipping at 1.0 and a per-step LR multiplier; what differs between the
components is only which index batches they draw and which schedule they use, so those are
arguments. (Training MGM itself is Hugging Face's Trainer, vlmlab/train/recipe.py.)
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm


def step_batches(n_items: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` full batches of indices: a permutation consumed in order, a fresh one when too few remain."""
    order, pos = torch.randperm(n_items, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n_items:
            order, pos = torch.randperm(n_items, generator=generator), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def epoch_batches(n_items: int, batch_size: int, epochs: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Each epoch a permutation split into batches (the last one may be smaller)."""
    for _ in range(epochs):
        yield from torch.randperm(n_items, generator=generator).split(batch_size)


def warmup_cosine_to_floor(steps: int) -> Callable[[int], float]:
    """Linear warmup over 5% of the steps, then cosine from 1 down to 0.1."""
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def warmup_times_cosine(total: int, warmup_frac: float) -> Callable[[int], float]:
    """A linear warmup over `warmup_frac` of the steps times a cosine from 1 to 0 over all of them."""
    warm = max(1, int(warmup_frac * total))
    return lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))


def train(params: list[torch.nn.Parameter], loss_fn: Callable[[torch.Tensor], torch.Tensor],
          batches: Iterable[torch.Tensor], schedule: Callable[[int], float], lr: float, desc: str,
          total: int | None = None, weight_decay: float = 0.01) -> list[float]:
    """AdamW over `params`: one step per index batch, loss_fn(indices) -> scalar loss. Returns the losses."""
    # fused: its sqrt is the CPU's own (exact); the per-tensor AdamW's goes through MKL's VML (vlmlab/determinism.py)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses: list[float] = []
    bar = tqdm(batches, total=total, desc=desc, mininterval=2.0)
    for idx in bar:
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
    return losses
