"""Seed sweep of the whole study: queue replicates, then summarise them.

    python stages/sweep.py queue --seeds 1,2     # dvc exp run --queue -S seed=1,2 ; dvc queue start
    dvc queue status                             # wait until every replicate is a success
    python stages/sweep.py report                # dvc exp show --json -> reports/sweep.md + plots/sweep.png

Not a DVC stage: it reads the experiments DVC keeps (`dvc exp show` cannot run inside
`dvc repro`). `report --exp_json FILE` reads a saved `dvc exp show --json` instead. The
committed workspace (seed of params.yaml) is a replicate too: its commit row is listed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# this checkout's vlmlab before any installed copy (it is not installed: see the Makefile)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from vlmlab import io  # noqa: E402
from vlmlab.evaluate import sweep  # noqa: E402
from vlmlab.evaluate.items import HEADLINE  # noqa: E402


def queue(seeds: str = "1,2", jobs: int = 1):
    """Queue one experiment per seed (a Hydra-style sweep of `seed`) and start the queue's workers."""
    seeds = ",".join(str(s) for s in (seeds if isinstance(seeds, (list, tuple)) else str(seeds).split(",")))
    subprocess.run(["dvc", "exp", "run", "--queue", "-S", f"seed={seeds}"], check=True)
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], check=True)
    print(f"queued seeds {seeds}; `dvc queue status` until done, then `python stages/sweep.py report`")


def report(exp_json: str = "", report: str = "reports/sweep.md", plot: str = "plots/sweep.png",
           include_workspace: bool = False):
    """reports/sweep.md and its plot from `dvc exp show --json` (run here, or read from `exp_json`)."""
    if exp_json:
        text = Path(exp_json).read_text(encoding="utf-8")
    else:
        text = subprocess.run(["dvc", "exp", "show", "--json"],
                              check=True, capture_output=True, text=True).stdout
    try:
        shown = json.loads(text)
    except json.JSONDecodeError as e:
        raise io.fail(f"{exp_json or 'dvc exp show --json'}: not JSON ({e.msg})") from None
    data = sweep.read(shown, include_workspace)
    metrics = list(HEADLINE)
    drawn = sweep.draw(plot, data, metrics)
    figure = os.path.relpath(plot, Path(report).parent) if drawn else None
    io.write_text(report, sweep.render(data, metrics, figure))
    seeds = [[r.seed for r in g] for g in sweep.groups(data)]
    print(f"sweep: {len(data.replicates)} replicates, seeds {seeds}, {len(data.skipped)} not used -> {report}")


if __name__ == "__main__":
    fire.Fire({"queue": queue, "report": report})
