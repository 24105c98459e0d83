"""Per-step training curves through dvclive: loss, lr, grad norm, samples/s, tokens/s.

Why not `report_to="dvclive"`: transformers' DVCLiveCallback ends its `Live` at the end of
each `Trainer.train()`, and the MGM recipe runs two Trainers (stage 1, stage 2) whose
curves belong on one step axis; it also cannot see throughput. This callback shares one
`Live` across both stages, offsetting stage 2's steps by stage 1's, and keeps the step rates
in the Trainer's log history so that a resumed run redraws every curve from its checkpoint.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

CURVES = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm"}


def samples_in_step(step: int, n_samples: int, global_batch: int) -> int:
    """Samples in optimizer step `step` (1-based) of a run over `n_samples` per epoch, last batch partial."""
    steps_per_epoch = -(-n_samples // global_batch)
    k = (step - 1) % steps_per_epoch
    return min(global_batch, n_samples - k * global_batch)


RATES = ("samples_per_s", "tokens_per_s", "step_s")


def curve_row(entry: dict, step_offset: int, stage: int) -> dict:
    """One Trainer log-history entry -> one row of the run's curves (dvclive names, run-wide step)."""
    row = {name: float(entry[key]) for key, name in CURVES.items() if entry.get(key) is not None}
    row.update({k: float(entry[k]) for k in RATES if k in entry})
    return {"step": step_offset + int(entry["step"]), **row, "stage": stage}


def replay(live, rows: list[dict]) -> None:
    """Rewrite dvclive's curves from `rows`: they are a function of the run's history, so a resumed
    run (whose plots folder DVC deleted before re-running the stage) draws the same curves."""
    shutil.rmtree(Path(live.plots_dir) / "metrics", ignore_errors=True)
    for row in rows:
        live.step = row["step"]
        for name, value in row.items():
            if name != "step":
                live.log_metric(name, value)
    if rows:
        live.make_summary()


class LiveCallback(TrainerCallback):
    def __init__(self, live, n_samples: int, global_batch: int, step_offset: int = 0, stage: int = 1,
                 earlier_rows=()):
        self.live, self.n, self.global_batch = live, n_samples, global_batch
        self.step_offset, self.stage, self.earlier_rows = step_offset, stage, list(earlier_rows)
        self._mark: tuple[float, int] | None = None  # (time, tokens seen) at the last step's log

    def on_train_begin(self, args, state, control, **kw):
        if self.live is not None and state.is_world_process_zero:
            # the earlier stages, then this stage's steps up to the checkpoint it resumed from (if any)
            restored = [curve_row(e, self.step_offset, self.stage) for e in state.log_history
                        if "loss" in e and e.get("step", 0) <= state.global_step]
            replay(self.live, self.earlier_rows + restored)

    def on_step_begin(self, args, state, control, **kw):
        if self._mark is None:
            self._mark = (time.perf_counter(), state.num_input_tokens_seen)

    def on_save(self, args, state, control, **kw):
        # a checkpoint's write is not the next step's time
        self._mark = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kw):
        if "loss" not in (logs or {}) or self._mark is None:
            return  # the end-of-training summary log has no per-step loss
        # Timed from log to log: the log reads the loss on the host, which waits for the step's GPU
        # work, so a step's time is its real wall time (a CUDA step is queued, not done, at on_step_end).
        now, t0, tokens0 = time.perf_counter(), *self._mark
        dt = now - t0
        self._mark = (now, state.num_input_tokens_seen)
        samples = samples_in_step(state.global_step, self.n, self.global_batch)
        rates = {"samples_per_s": samples / dt, "tokens_per_s": (state.num_input_tokens_seen - tokens0) / dt,
                 "step_s": dt}
        # the rates go into the log history, which every checkpoint saves: curves and figures survive a resume
        state.log_history[-1].update(rates)
        if not state.is_world_process_zero:
            return
        row = curve_row(state.log_history[-1], self.step_offset, self.stage)
        every = max(1, state.max_steps // 10)
        if state.global_step % every == 0 or state.global_step == state.max_steps:
            print(f"stage {self.stage} step {state.global_step}/{state.max_steps}: loss {row.get('loss', float('nan')):.3f}, "
                  f"lr {row.get('lr', 0):.2e}, {row.get('samples_per_s', 0):.0f} samples/s", flush=True)
        if self.live is not None:
            self.live.step = row["step"]
            for name, value in row.items():
                if name != "step":
                    self.live.log_metric(name, value)
            self.live.make_summary()
