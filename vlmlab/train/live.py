"""Per-step training curves through dvclive: loss, lr, grad norm, samples/s, tokens/s.

Why not `report_to="dvclive"`: transformers' DVCLiveCallback ends its `Live` at the end of
each `Trainer.train()`, and the MGM recipe runs two Trainers (stage 1, stage 2) whose
curves belong on one step axis; it also cannot see throughput. This callback shares one
`Live` across both stages, offsetting stage 2's steps by stage 1's.
"""
from __future__ import annotations

import time
from pathlib import Path

from transformers import TrainerCallback

CURVES = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm"}


def samples_in_step(step: int, n_samples: int, global_batch: int) -> int:
    """Samples in optimizer step `step` (1-based) of a run over `n_samples` per epoch, last batch partial."""
    steps_per_epoch = -(-n_samples // global_batch)
    k = (step - 1) % steps_per_epoch
    return min(global_batch, n_samples - k * global_batch)


def truncate_curves(folder: Path, last_step: int) -> None:
    """Drop rows after `last_step` from dvclive's TSV curves (header: step, value)."""
    for tsv in folder.rglob("*.tsv") if folder.is_dir() else ():
        lines = tsv.read_text().splitlines(keepends=True)
        kept = lines[:1] + [ln for ln in lines[1:] if int(ln.split("\t", 1)[0]) <= last_step]
        if len(kept) < len(lines):
            tsv.write_text("".join(kept))


class LiveCallback(TrainerCallback):
    def __init__(self, live, n_samples: int, global_batch: int, step_offset: int = 0, stage: int = 1):
        self.live, self.n, self.global_batch = live, n_samples, global_batch
        self.step_offset, self.stage = step_offset, stage
        self._t0 = None
        self._tokens0 = 0
        self._rates: dict[str, float] = {}
        self.steps: list[dict] = []  # what was logged, for the stage's final figures

    def on_train_begin(self, args, state, control, **kw):
        if self.live is not None and state.is_world_process_zero:
            # resumed from a checkpoint: the steps logged after it are about to be redone
            truncate_curves(Path(self.live.plots_dir) / "metrics", self.step_offset + state.global_step)

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()
        self._tokens0 = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kw):
        dt = time.perf_counter() - self._t0
        samples = samples_in_step(state.global_step, self.n, self.global_batch)
        self._rates = {"samples_per_s": samples / dt, "tokens_per_s": (state.num_input_tokens_seen - self._tokens0) / dt,
                       "step_s": dt}

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or "loss" not in (logs or {}):
            return  # the end-of-training summary log has no per-step loss
        row = {name: float(logs[key]) for key, name in CURVES.items() if logs.get(key) is not None}
        row.update(self._rates)
        row["stage"] = self.stage
        self.steps.append(row)
        every = max(1, state.max_steps // 10)
        if state.global_step % every == 0 or state.global_step == state.max_steps:
            print(f"stage {self.stage} step {state.global_step}/{state.max_steps}: loss {row.get('loss', float('nan')):.3f}, "
                  f"lr {row.get('lr', 0):.2e}, {row.get('samples_per_s', 0):.0f} samples/s", flush=True)
        if self.live is not None:
            self.live.step = self.step_offset + state.global_step
            for name, value in row.items():
                self.live.log_metric(name, value)
            self.live.make_summary()
