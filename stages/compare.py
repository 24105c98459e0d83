"""Stage `compare`: one report over every run — the factor effects of the 2x2 design
{data} x {strategy} with paired-bootstrap intervals, every model's metrics with their
intervals, data stats raw vs enhanced, training cost, memory peaks, the best model by
params `compare.metric` (and whether it beats the runner-up), merged LoRA vs adapter.

    python stages/compare.py --preds data/eval --report reports/compare.md \
        --metrics metrics/compare.json --plots plots/compare

Reads the metrics/ and plots/ files the other stages wrote and the per-item predictions
under `preds`; what is absent is reported as absent. Writes the markdown report, flat
metrics and, under `plots`, long-format CSVs (DVC plots) and PNGs: metric bars with
interval error bars, factor effects, loss curves overlaid, memory over time overlaid.
"""
from __future__ import annotations

import sys
from pathlib import Path

# this checkout's vlmlab before any installed copy: a clone or a `dvc exp run --temp` copy runs its own code
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmlab.determinism import pin; pin()  # noqa: E702  first: CPU kernels bit for bit on any x86 (vlmlab/determinism.py)

import os

import fire

from vlmlab import io
from vlmlab.evaluate import compare as cmp
from vlmlab.evaluate import compare_plots as cplots
from vlmlab.params import load as load_params


def main(report: str, metrics: str, plots: str, preds: str = "data/eval", params: str = "params.yaml"):
    all_params = load_params(params)
    p, ev = all_params["compare"], all_params["evaluate"]
    runs = all_params.get("runs", {})
    models = ev["models"]
    boot = cmp.Bootstrap(ev["bootstrap_samples"], ev["bootstrap_seed"], ev["ci_level"])
    root, plots = Path("."), Path(plots)

    col = cmp.collect(root, p["datasets"], list(runs), models, preds)
    effects, note = cmp.factor_effects(col, runs, p["datasets"], p["strategies"], boot)
    top = cmp.best_and_runner_up(col, p["metric"], boot)
    series = {
        "metrics": (cplots.eval_rows(col), ["model", "metric", "value", "ci_low", "ci_high"]),
        "effects": (cplots.effect_rows(effects), ["effect", "metric", "value", "ci_low", "ci_high", "called"]),
        "loss": (cplots.loss_rows(root, list(runs)), ["step", "loss", "series"]),
        "memory": (cplots.memory_rows(root), ["t_s", "memory_mb", "series"]),
    }
    figures = {}
    for kind, (rows, fields) in series.items():
        cplots.write_csv(plots / f"{kind}.csv", rows, fields)
        drawn = cplots.draw_effects(plots / f"{kind}.png", rows) if kind == "effects" else cplots.draw(plots / f"{kind}.png", kind, rows)
        if drawn:
            figures[kind] = os.path.relpath(plots / f"{kind}.png", Path(report).parent)

    io.write_text(report, cmp.render_markdown(col, p["metric"], p["merge_tolerance"], figures, effects, note, boot, top,
                                              cmp.cells_line(runs, models, p["datasets"], p["strategies"])))
    io.write_metrics(metrics, cmp.summary(col, p["metric"], p["merge_tolerance"], effects, top))
    called = [f"{e.name}/{e.metric}" for e in effects if e.name in ("data", "strategy", "interaction") and e.interval.called]
    evaluated = sum(m is not None for m in col.eval.values())
    print(f"compare: {evaluated}/{len(models)} models evaluated; "
          + (f"effects called: {', '.join(called) or 'none'}" if effects else f"effects not estimated ({note})")
          + f" -> {report}")


if __name__ == "__main__":
    fire.Fire(main)
