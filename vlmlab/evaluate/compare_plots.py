"""Series and figures of `compare`: long-format CSVs for DVC plots and PNGs for the report.

Metric bars carry the bootstrap intervals as error bars (CSV columns ci_low/ci_high), the
factor effects are a forest plot around zero; loss and memory curves are overlaid per run.
"""
from __future__ import annotations

import csv
from pathlib import Path

from vlmlab import io
from vlmlab.evaluate.compare import EVAL_KEYS, Collected, Effect


def eval_rows(col: Collected) -> list[dict]:
    """Long format; ci_low/ci_high empty for the metrics without an interval (BLEU-1..3)."""
    return [{"model": n, "metric": k, "value": m[k], "ci_low": m.get(f"{k}_ci_low", ""),
             "ci_high": m.get(f"{k}_ci_high", "")} for n, m in col.eval.items() if m for k in EVAL_KEYS if k in m]


def effect_rows(effects: list[Effect]) -> list[dict]:
    return [{"effect": e.name, "metric": e.metric, "value": e.interval.value, "ci_low": e.interval.ci_low,
             "ci_high": e.interval.ci_high, "called": int(e.interval.called)} for e in effects]


def loss_rows(root: Path, runs: list[str]) -> list[dict]:
    """dvclive's per-step loss of each train run (plots/train/<run>/plots/metrics/loss.tsv)."""
    rows = []
    for run in runs:
        path = root / "plots" / "train" / run / "plots" / "metrics" / "loss.tsv"
        if path.is_file():
            with open(path, newline="") as f:
                rows += [{"step": int(r["step"]), "loss": float(r["loss"]), "series": run}
                         for r in csv.DictReader(f, delimiter="\t")]
    return rows


def memory_rows(root: Path) -> list[dict]:
    """Memory over time of every monitored stage (plots/monitor/*.csv): GPU memory if any was used, else RSS."""
    rows = []
    for path in sorted((root / "plots" / "monitor").glob("*.csv")):
        with open(path, newline="") as f:
            samples = list(csv.DictReader(f))
        if not samples:
            continue
        key = "gpu_mem_mb" if any(float(s.get("gpu_mem_mb") or 0) > 0 for s in samples) else "rss_mb"
        rows += [{"t_s": float(s["t_s"]), "memory_mb": float(s[key]), "series": path.stem} for s in samples]
    return rows


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def draw(path: Path, kind: str, rows: list[dict]) -> bool:
    """PNG of `kind` (metrics | loss | memory) from its rows; with no rows the PNG says so (False)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    if not rows:
        ax.text(0.5, 0.5, f"no {kind} data yet", ha="center", va="center")
        ax.set_axis_off()
    elif kind == "metrics":
        models = list(dict.fromkeys(r["model"] for r in rows))
        metrics = list(dict.fromkeys(r["metric"] for r in rows))
        width = 0.8 / len(models)
        by = {(r["model"], r["metric"]): r for r in rows}
        for i, model in enumerate(models):
            xs = [j + i * width for j in range(len(metrics))]
            got = [by.get((model, k)) for k in metrics]
            vals = [r["value"] if r else 0.0 for r in got]
            # error bars: the bootstrap interval where the metric has one (BLEU-1..3 do not)
            err = [[v - r["ci_low"] if r and r.get("ci_low") != "" else 0.0 for v, r in zip(vals, got)],
                   [r["ci_high"] - v if r and r.get("ci_high") != "" else 0.0 for v, r in zip(vals, got)]]
            ax.bar(xs, vals, width, yerr=err, capsize=2, label=model)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=30, ha="right")
        ax.set_ylabel("score (CIDEr-D on its own 0-10 scale)")
    else:
        x, y, group = {"loss": ("step", "loss"), "memory": ("t_s", "memory_mb")}[kind] + ("series",)
        for name in dict.fromkeys(r[group] for r in rows):
            pts = [r for r in rows if r[group] == name]
            ax.plot([p[x] for p in pts], [p[y] for p in pts], label=name)
        ax.set_xlabel({"step": "optimizer step", "t_s": "seconds"}[x])
        ax.set_ylabel({"loss": "training loss", "memory_mb": "memory (MiB)"}[y])
    if rows:
        ax.legend(fontsize=8)
    ax.set_title({"metrics": "evaluation metrics per model (bars: bootstrap intervals)", "loss": "training loss per run",
                  "memory": "memory over time per stage"}[kind])
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return bool(rows)


def draw_effects(path: Path, rows: list[dict]) -> bool:
    """Forest plot of the factor effects, one panel per metric: estimate, interval, the zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in rows)) or ["none"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 3.6), dpi=100, sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        pts = [r for r in rows if r["metric"] == metric]
        if not pts:
            ax.text(0.5, 0.5, "factor effects not estimated", ha="center", va="center")
            ax.set_axis_off()
            continue
        ys = list(range(len(pts)))[::-1]
        for y, r in zip(ys, pts):
            ax.errorbar(r["value"], y, xerr=[[r["value"] - r["ci_low"]], [r["ci_high"] - r["value"]]], fmt="o",
                        color="tab:red" if r["called"] else "tab:gray", capsize=3)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(ys, [r["effect"] for r in pts])
        ax.set_ylim(-0.6, len(pts) - 0.4)
        ax.set_title(metric, fontsize=9)
    fig.suptitle("factor effects with paired-bootstrap intervals (red: interval excludes 0)", fontsize=10)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return bool(rows)
