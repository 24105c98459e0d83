"""Stage `compare`: one report over every run — data stats raw vs enhanced, training cost,
evaluation metrics, memory peaks, the best model by params `compare.metric`, and merged
LoRA models checked against their adapters.

    python stages/compare.py --report reports/compare.md --metrics metrics/compare.json --plots plots/compare

Reads the metrics/ and plots/ files the other stages wrote; what is absent is reported as
absent. Writes the markdown report, flat metrics and, under `plots`, long-format CSVs (DVC
plots) and PNGs: metric bars per model, loss curves overlaid, memory over time overlaid.
"""
from __future__ import annotations

from vlmlab.determinism import pin; pin()  # noqa: E702  first: CPU kernels bit for bit on any x86 (vlmlab/determinism.py)
import os
from pathlib import Path

import fire

from vlmlab import io
from vlmlab.evaluate import compare as cmp


def main(report: str, metrics: str, plots: str, params: str = "params.yaml"):
    all_params = io.load_params(params)
    p = all_params["compare"]
    runs = list(all_params.get("runs", {}))
    models = all_params["evaluate"]["models"]
    root, plots = Path("."), Path(plots)

    col = cmp.collect(root, p["datasets"], runs, models)
    series = {
        "metrics": (cmp.eval_rows(col), ["model", "metric", "value"]),
        "loss": (cmp.loss_rows(root, runs), ["step", "loss", "series"]),
        "memory": (cmp.memory_rows(root), ["t_s", "memory_mb", "series"]),
    }
    figures = {}
    for kind, (rows, fields) in series.items():
        cmp.write_csv(plots / f"{kind}.csv", rows, fields)
        if cmp.draw(plots / f"{kind}.png", kind, rows):
            figures[kind] = os.path.relpath(plots / f"{kind}.png", Path(report).parent)

    io.write_text(report, cmp.render_markdown(col, p["metric"], p["merge_tolerance"], figures))
    io.write_metrics(metrics, cmp.summary(col, p["metric"], p["merge_tolerance"]))
    best = cmp.best_model(col.eval, p["metric"])
    evaluated = sum(m is not None for m in col.eval.values())
    print(f"compare: {evaluated}/{len(models)} models evaluated; best by {p['metric']}: "
          f"{f'{best[0]} ({best[1]:.4f})' if best else 'none yet'} -> {report}")


if __name__ == "__main__":
    fire.Fire(main)
