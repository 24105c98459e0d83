"""Seed sweep of the whole study: queue replicates, then summarise them.

    python stages/sweep.py queue --seeds 1,2     # dvc exp run --queue -S seed=1,2 ; dvc queue start
    dvc queue status                             # wait until every replicate is a success
    python stages/sweep.py report                # dvc exp show --json -> reports/sweep.md + plots/sweep.png
    python stages/sweep.py queue_teacher --seeds 3,4   # side study: the teacher alone on more seeds
    python stages/sweep.py queue_dose --sizes 300,1000  # side study: stage-1 caption sets of other sizes/noise
                                                        # (--seeds 0,1,2: over the sweep's seeds)
    python stages/sweep.py report --only NAME-   # a recipe not committed: its experiments queued as NAME-seedN,
                                                 # NAME-dose-..., from any commit (--report elsewhere)

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
from vlmlab.evaluate import items, sweep  # noqa: E402


def queue(seeds: str = "1,2", jobs: int = 1):
    """Queue one experiment per seed (a Hydra-style sweep of `seed`) and start the queue's workers."""
    seeds = ",".join(_split(seeds))
    subprocess.run(["dvc", "exp", "run", "--queue", "-S", f"seed={seeds}"], check=True)
    _start(jobs)


def queue_teacher(seeds: str = "3,4", jobs: int = 1):
    """The teacher alone on more seeds (prepare + teacher only): is its quality robust to the seed?"""
    for seed in _split(seeds):
        subprocess.run(["dvc", "exp", "run", "--queue", "-n", f"{sweep.TEACHER_PREFIX}{seed}", "-S", f"seed={seed}",
                        "teacher"], check=True)
    _start(jobs)


def queue_dose(sizes: str = "300,1000", accurate: int = 4000, seeds: str = "", jobs: int = 1):
    """Stage-1 caption sets of other sizes (world.raw_size) and one all accurate (world.noise_rate=0):
    pretrain@raw, train@baseline and evaluate@baseline on each (targets bring their upstream). Does stage-1 data move the eval metrics?
    `seeds`: replicate each set over these seeds (queue the seed sweep first: its zoo runs are reused
    from DVC's run cache, and its replicates are the committed set's row for their seed)."""
    variants = [(f"{sweep.DOSE_PREFIX}{n}", [f"world.raw_size={n}"]) for n in _split(sizes)]
    if accurate:
        variants.append((f"{sweep.DOSE_PREFIX}{accurate}-accurate", [f"world.raw_size={accurate}", "world.noise_rate=0.0"]))
    for seed in _split(seeds) if seeds != "" else [None]:
        for name, sets in variants:
            named, sets = (name, sets) if seed is None else (f"{name}-seed{seed}", [*sets, f"seed={seed}"])
            subprocess.run(["dvc", "exp", "run", "--queue", "-n", named, *[a for s in sets for a in ("-S", s)],
                            "train@baseline", "evaluate@baseline"], check=True)
    _start(jobs)


def _shown(exp_json: str, where: list[str]) -> list:
    """`dvc exp show --json` output: read from `exp_json`, or run with `where` (--rev / --all-commits)."""
    if exp_json:
        text = Path(exp_json).read_text(encoding="utf-8")
    else:
        text = subprocess.run(["dvc", "exp", "show", "--json", *where], check=True, capture_output=True, text=True).stdout
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise io.fail(f"{exp_json or 'dvc exp show --json'}: not JSON ({e.msg})") from None


def _same_pipeline(a: str, b: str) -> bool:
    """Commits `a` and `b` hold the same dvc.yaml, dvc.lock and params.yaml (so the same code, by hash)."""
    def show(rev: str, path: str) -> bytes:
        return subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True).stdout
    return all(show(a, f) == show(b, f) for f in ("dvc.yaml", "dvc.lock", "params.yaml"))


def _start(jobs: int) -> None:
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], check=True)
    print("queued; `dvc queue status` until done, then `python stages/sweep.py report`")


def _split(values) -> list[str]:
    return [str(v) for v in (values if isinstance(values, (list, tuple)) else str(values).split(","))]


def _predictions(model: str):
    """rev -> `model`'s per-item statistics in that commit or experiment: its data/eval/<model> from DVC's
    cache (experiments commit their outputs there), read once per rev."""
    import tempfile

    from dvc.api import DVCFileSystem

    cache: dict = {}

    def statistics(rev: str):
        if rev not in cache:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    DVCFileSystem(".", rev=rev).get(f"data/eval/{model}", tmp + "/p", recursive=True)
                except Exception as e:  # noqa: BLE001 - gc'd cache, a remote not pulled: say which run
                    raise io.fail(f"sweep report: no data/eval/{model} for {rev[:7]} ({type(e).__name__}: {e}); "
                                  "`dvc exp pull` it or re-run the experiment") from None
                cache[rev] = items.load_statistics(tmp + "/p")
        return cache[rev]
    return statistics


def report(exp_json: str = "", report: str = "reports/sweep.md", plot: str = "plots/sweep.png",
           include_workspace: bool = False, rev: str = "", only: str = "", paired: bool = True, dose_rev: str = ""):
    """reports/sweep.md and its plot from `dvc exp show --json` (run here, or read from `exp_json`).
    `rev`: the commit the experiments were queued from, once later commits moved HEAD on (`dvc exp show --rev`).
    `only`: just the experiments whose names start with this, from every commit (a recipe not committed yet,
    queued under its own names: no commit row, no other experiment). `paired`: the dose steps as paired
    differences on the runs' per-item predictions (read from DVC's cache; evaluate's bootstrap params).
    `dose_rev`: the dose side study queued from that commit, where this one's change leaves its runs alone
    (checked: this commit's own baseline runs must score exactly as that commit's, seed by seed)."""
    shown = _shown(exp_json, ["--all-commits"] if only else ["--rev", str(rev)] if rev else [])
    if only:
        shown = sweep.only(shown, str(only))
    data = sweep.read(shown, include_workspace)
    metrics = list(items.HEADLINE)
    drawn = sweep.draw(plot, data, metrics)
    figure = os.path.relpath(plot, Path(report).parent) if drawn else None
    doses = sweep.dose(shown)
    if dose_rev:
        same = _same_pipeline(str(rev) or "HEAD", str(dose_rev))
        doses = sweep.dose_of_another_commit(sweep.dose(_shown("", ["--rev", str(dose_rev)])), doses, same)
    steps, spans = [], []
    if doses and paired:
        ev = io.load_params()["evaluate"]
        predictions = _predictions("baseline")
        boot = (int(ev["bootstrap_samples"]), int(ev["bootstrap_seed"]), float(ev["ci_level"]))
        steps = sweep.dose_steps(doses, predictions, metrics, *boot)
        spans = sweep.dose_steps(doses, predictions, metrics, *boot, reference=sweep.from_smallest)
    side = sweep.render_side_studies(sweep.teacher_seeds(shown), doses, metrics, steps=steps, spans=spans,
                                     dose_rev=str(dose_rev))
    io.write_text(report, sweep.render(data, metrics, figure) + ("\n" + side if side else ""))
    seeds = [[r.seed for r in g] for g in sweep.groups(data)]
    print(f"sweep: {len(data.replicates)} replicates, seeds {seeds}, {len(data.skipped)} not used -> {report}")


if __name__ == "__main__":
    fire.Fire({"queue": queue, "queue_teacher": queue_teacher, "queue_dose": queue_dose, "report": report})
