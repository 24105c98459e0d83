"""Compare runs: gather the metrics every stage wrote, tabulate them with their intervals,
estimate the factor effects of the 2x2 design by paired bootstrap, pick the best model,
check merged models against their adapters, and draw the overlays.

Only what exists is reported: a run whose metrics file is absent (e.g. the enhanced set
not synthesized yet) shows as "absent" and never as a number. A difference is called only
when its paired interval excludes 0; otherwise the report says "no significant difference".
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from vlmlab import io
from vlmlab.evaluate import factorial, items
from vlmlab.evaluate.bootstrap import Interval, Statistic, contrast, contrasts

OTHER_STAGES = ["zoo", "teacher", "synth"]   # metrics/<stage>.json with a monitor section
EVAL_KEYS = ["textvqa_acc", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "mmbench_acc", "mmbench_circular_acc"]
HEADLINE = list(items.HEADLINE)  # the metrics with intervals (metrics/eval/<model>.json: <metric>_ci_low/_ci_high)
DATA_KEYS = [("samples", "samples"), ("rejects.total", "rejects"), ("caption_words.mean", "words/caption"),
             ("caption_chars.mean", "chars/caption"), ("vocab_size", "vocabulary"),
             ("duplicate_caption_share", "duplicate share")]
PRETRAIN_KEYS = [("stage1.wall_s", "stage-1 s"), ("stage1.samples_per_s", "samples/s"), ("stage1.tokens_per_s", "tokens/s"),
                 ("stage1.steps", "steps"), ("stage1_loss", "stage-1 final loss")]
TRAIN_KEYS = [("train_s", "train s"), ("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"),
              ("trainable.total", "trainable params"), ("train_loss", "stage-2 loss"), ("final_loss", "final loss")]
PEAK_KEYS = [("monitor.wall_s", "wall s"), ("monitor.peak_rss_mb", "peak RSS MB"),
             ("monitor.peak_gpu_mem_mb", "peak GPU MB"), ("monitor.peak_torch_alloc_mb", "peak torch alloc MB")]


@dataclass
class Collected:
    data: dict[str, dict | None] = field(default_factory=dict)    # dataset -> flat metrics (None: absent)
    pretrain: dict[str, dict | None] = field(default_factory=dict)  # caption set -> its stage 1's flat metrics
    train: dict[str, dict | None] = field(default_factory=dict)   # run -> flat metrics
    eval: dict[str, dict | None] = field(default_factory=dict)    # model -> flat metrics
    model_paths: dict[str, str] = field(default_factory=dict)     # model -> folder
    other: dict[str, dict] = field(default_factory=dict)          # zoo / teacher / synth stage metrics, if present
    items: dict[str, dict[str, Statistic] | None] = field(default_factory=dict)  # model -> per-item statistics


@dataclass
class Bootstrap:
    samples: int    # resamples
    seed: int
    level: float    # e.g. 0.95


@dataclass
class Effect:
    name: str       # data | strategy | interaction | data_in_<strategy> | strategy_in_<data> | <a>_vs_<b>
    metric: str
    interval: Interval
    verdict: str


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return io.flatten(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, AttributeError) as e:
        raise io.fail(f"{path}: unreadable metrics ({e}); re-run the stage that writes it") from None


def collect(root: Path, datasets: list[str], runs: list[str], models: dict[str, str],
            preds: str = "data/eval") -> Collected:
    """Every stage's metrics under root/metrics, and each model's per-item results under root/preds/<model>."""
    m = root / "metrics"
    return Collected(
        data={d: _read(m / "data" / f"{d}.json") for d in datasets},
        pretrain={d: _read(m / "pretrain" / f"{d}.json") for d in datasets},
        train={r: _read(m / "train" / f"{r}.json") for r in runs},
        eval={name: _read(m / "eval" / f"{name}.json") for name in models},
        model_paths=dict(models),
        other={n: r for n in OTHER_STAGES if (r := _read(m / f"{n}.json"))},
        items={name: items.load_statistics(root / preds / name) for name in models},
    )


def factor_effects(col: Collected, runs: dict[str, dict], data_levels: list[str], strategy_levels: list[str],
                   boot: Bootstrap) -> tuple[list[Effect], str]:
    """Main effects, interaction and simple effects per headline metric, by paired bootstrap.

    Returns ([], reason) when the runs do not fill the 2x2 design or a cell is not evaluated yet.
    """
    cells, why = factorial.cells(runs, col.model_paths, data_levels, strategy_levels)
    if cells is None:
        return [], why
    absent = [m for m in cells.values() if not col.items.get(m)]
    if absent:
        return [], f"no per-item results for {', '.join(absent)} (data/eval/<model>) yet"
    weights = factorial.contrasts(cells, data_levels, strategy_levels)
    out = []
    for metric in HEADLINE:
        stats = items.align({m: col.items[m] for m in cells.values()}, metric)
        if len(stats) < 4:
            continue
        counts = items.resample_counts_for(stats, boot.samples, boot.seed)
        for name, iv in contrasts(stats, weights, counts, boot.level).items():
            out.append(Effect(name, metric, iv, factorial.verdict(name, iv.called, iv.value > 0,
                                                                  data_levels, strategy_levels)))
    return out, ""


def cells_line(runs: dict[str, dict], models: dict[str, str], data_levels: list[str], strategy_levels: list[str]) -> str:
    """One line naming the model in each cell of the design, for the report."""
    c, _ = factorial.cells(runs, models, data_levels, strategy_levels)
    if not c:
        return ""
    return "Cells: " + "; ".join(f"{d} × {s} = `{c[d, s]}`" for d in data_levels for s in strategy_levels) + "."


def paired_difference(col: Collected, a: str, b: str, metric: str, boot: Bootstrap) -> Interval | None:
    """metric(a) - metric(b) on the same resampled items; None when either has no per-item results."""
    if not col.items.get(a) or not col.items.get(b):
        return None
    stats = items.align({a: col.items[a], b: col.items[b]}, metric)
    if len(stats) < 2:
        return None
    return contrast(stats, {a: 1.0, b: -1.0}, items.resample_counts_for(stats, boot.samples, boot.seed), boot.level)


def best_and_runner_up(col: Collected, metric: str, boot: Bootstrap) -> tuple[str, str, Interval] | None:
    """The top two models by `metric` and their paired difference (None with fewer than two)."""
    scored = sorted(((m[metric], n) for n, m in col.eval.items() if m and metric in m), reverse=True)
    if len(scored) < 2:
        return None
    diff = paired_difference(col, scored[0][1], scored[1][1], metric, boot)
    return (scored[0][1], scored[1][1], diff) if diff else None


def best_model(evals: dict[str, dict | None], metric: str) -> tuple[str, float] | None:
    """(name, value) of the model with the highest `metric` among those evaluated; None if none has it."""
    scored = [(name, m[metric]) for name, m in evals.items() if m and metric in m]
    return max(scored, key=lambda x: x[1]) if scored else None


def merged_pairs(model_paths: dict[str, str]) -> list[tuple[str, str]]:
    """(merged model, adapter model) pairs: models/merged/<run> against models/runs/<run>."""
    by_path = {Path(p).as_posix().rstrip("/"): n for n, p in model_paths.items()}
    pairs = []
    for name, path in model_paths.items():
        p = Path(path)
        if p.parent.name == "merged":
            adapter = by_path.get((p.parent.parent / "runs" / p.name).as_posix())
            if adapter:
                pairs.append((name, adapter))
    return pairs


def merge_checks(col: Collected, tolerance: float) -> dict[str, dict]:
    """Per merged model: the largest |difference| of the headline metrics against its adapter run."""
    out = {}
    for merged, adapter in merged_pairs(col.model_paths):
        a, b = col.eval.get(merged), col.eval.get(adapter)
        if not a or not b:
            continue
        diffs = {k: abs(a[k] - b[k]) for k in EVAL_KEYS if k in a and k in b}
        worst = max(diffs.values()) if diffs else math.nan
        out[merged] = {"adapter": adapter, "max_abs_diff": worst, "within_tolerance": worst <= tolerance,
                       "diffs": diffs}
    return out


def _fmt(v, score: bool = True) -> str:
    """Scores with 4 decimals; counts, seconds and megabytes with thousands and at most 1 decimal."""
    if v is None:
        return "absent"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 100):
        return f"{int(v):,}"
    if isinstance(v, float):
        return f"{v:.4f}" if score and abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def _table(title_col: str, rows: dict[str, dict | None], keys: list[tuple[str, str]], score: bool = True) -> list[str]:
    head = [title_col] + [label for _, label in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows.items():
        if m is None:
            cells = ["absent"] + [""] * (len(keys) - 1)
        else:
            cells = [_fmt(m[k], score) if k in m else "—" for k, _ in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _diff(v: float) -> str:
    """A signed difference; below 1e-3 in scientific notation, so a called difference never reads +0.0000."""
    return f"{v:+.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:+.2e}"


def _with_ci(m: dict, key: str) -> str:
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return f"{m[key]:.4f} [{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else _fmt(m[key])


def _eval_table(col: Collected) -> list[str]:
    keys = EVAL_KEYS + ["questions_per_s"]
    lines = ["| model | " + " | ".join(k.replace("questions_per_s", "questions/s") for k in keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    for name, m in col.eval.items():
        if m is None:
            lines.append(f"| {name} | absent |" + " |" * (len(keys) - 1))
            continue
        cells = [(_with_ci(m, k) if k in HEADLINE else _fmt(m[k])) if k in m else "—" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _reads_images(m: dict, metric: str) -> bool:
    """Seeing beats blind on `metric` beyond its interval (the evaluate stage's blind control)."""
    return m[f"{metric}_minus_blind_ci_low"] > 0


def _blind_section(col: Collected) -> list[str]:
    """Seeing - blind per model and headline metric (evaluate.blind_control); empty when no model has it."""
    rows = {n: m for n, m in col.eval.items() if m and any(f"{k}_minus_blind" in m for k in HEADLINE)}
    if not rows:
        return []
    keys = [k for k in HEADLINE if any(f"{k}_minus_blind" in m for m in rows.values())]
    out = ["## Blind control: does each model read its images?", "",
           "Seeing − blind (every image replaced by one blank image), paired bootstrap over the same items. "
           "**reads** when the interval lies above 0; a metric a model scores as well blind is answered from "
           "the question and the language prior, and a difference between runs on it is not about the images.", "",
           "| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, m in rows.items():
        cells = [f"{_diff(m[k + '_minus_blind'])} [{_diff(m[k + '_minus_blind_ci_low'])}, "
                 f"{_diff(m[k + '_minus_blind_ci_high'])}]" + (" **reads**" if _reads_images(m, k) else "")
                 if f"{k}_minus_blind" in m else "—" for k in keys]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out + [""]


def _effects_section(effects: list[Effect], note: str, boot: Bootstrap, cells_line: str) -> list[str]:
    out = ["## Factor effects (paired bootstrap)", ""]
    if not effects:
        return out + [f"Not estimated: {note}.", ""]
    out += [cells_line, "",
            f"Each effect is a difference of cell means on the same items, resampled together for all "
            f"four models ({boot.samples} resamples, seed {boot.seed}); the interval is the central "
            f"{boot.level:.0%} percentile interval. An effect is called only when it excludes 0.", "",
            "| effect | metric | estimate | interval | verdict |", "|---|---|---|---|---|"]
    main = [e for e in effects if e.name in ("data", "strategy", "interaction")]
    simple = [e for e in effects if e not in main]
    for e in main + simple:
        iv = e.interval
        out.append(f"| {e.name} | {e.metric} | {_diff(iv.value)} | [{_diff(iv.ci_low)}, {_diff(iv.ci_high)}] | {e.verdict} |")
    return out + [""]


def render_markdown(col: Collected, metric: str, tolerance: float, figures: dict[str, str],
                    effects: list[Effect] = (), effects_note: str = "", boot: Bootstrap | None = None,
                    top: tuple[str, str, Interval] | None = None, cells_line: str = "") -> str:
    best = best_model(col.eval, metric)
    checks = merge_checks(col, tolerance)
    out = ["# Run comparison", ""]
    if best and top:
        a, b, iv = top
        verdict = (f"significantly above `{b}`" if iv.called and iv.value > 0 else
                   f"no significant difference from the runner-up `{b}`")
        out += [f"**Highest `{metric}`: `{a}` ({best[1]:.4f}); {verdict} "
                f"(paired difference {_diff(iv.value)}, interval [{_diff(iv.ci_low)}, {_diff(iv.ci_high)}]).**", ""]
    elif best:
        out += [f"**Highest `{metric}`: `{best[0]}` ({best[1]:.4f}).**", ""]
    else:
        out += [f"No evaluated model has `{metric}` yet.", ""]
    if boot is not None:
        out += _effects_section(list(effects), effects_note, boot, cells_line)
    out += ["## Evaluation", ""]
    if boot is not None:
        out += [f"Headline metrics as value [{boot.level:.0%} bootstrap interval] over the benchmark's items "
                "(TextVQA questions, caption images, MMBench questions with all their rotations).", ""]
    out += _eval_table(col)
    out += [""]
    if any(m is None for m in col.eval.values()):
        out += ["Absent: the model's `evaluate` stage has not produced metrics/eval/<model>.json.", ""]
    out += _blind_section(col)
    if checks:
        out += ["## Merged LoRA vs adapter", "", f"Tolerance on every headline metric: {tolerance}.", "",
                "| merged | adapter | max abs diff | within tolerance |", "|---|---|---|---|"]
        out += [f"| {m} | {c['adapter']} | {c['max_abs_diff']:.4g} | {_fmt(c['within_tolerance'])} |" for m, c in checks.items()]
        out += [""]
    out += ["## Data: raw vs enhanced", ""] + _table("set", col.data, DATA_KEYS) + [""]
    out += ["## Training cost", "", "Stage 1 runs once per caption set (`pretrain@<set>`) and its runs share it; "
            "a run's own cost is its stage 2.", ""]
    out += _table("set", col.pretrain, PRETRAIN_KEYS) + [""] + _table("run", col.train, TRAIN_KEYS) + [""]
    peaks = dict(col.other)
    peaks.update({f"pretrain {d}": m for d, m in col.pretrain.items() if m})
    peaks.update({f"train {r}": m for r, m in col.train.items()})
    peaks.update({f"evaluate {n}": m for n, m in col.eval.items()})
    out += ["## Memory and time peaks (per stage)", ""] + _table("stage", peaks, PEAK_KEYS, score=False) + [""]
    for title, prefix, suffix in (("TextVQA accuracy by question type", "textvqa_by_type.", ""),
                                  ("MMBench circular accuracy by category", "mmbench_by_category.", ".circular_acc")):
        cols = sorted({k[len(prefix):len(k) - len(suffix)] for m in col.eval.values() if m for k in m
                       if k.startswith(prefix) and k.endswith(suffix)})
        if cols:
            rows = {n: m for n, m in col.eval.items() if m}
            out += [f"## {title}", "", "Point values only (no intervals): categories are small.", ""]
            out += _table("model", rows, [(f"{prefix}{c}{suffix}", c) for c in cols]) + [""]
    if figures:
        out += ["## Figures", ""] + [f"![{k}]({v})" for k, v in figures.items()] + [""]
    return "\n".join(out)


def summary(col: Collected, metric: str, tolerance: float, effects: list[Effect] = (),
            top: tuple[str, str, Interval] | None = None) -> dict:
    """metrics/compare.json: numbers only (DVC drops strings); the best model is flagged per model.

    effects.<effect>.<metric>.{value, ci_low, ci_high, called (1 when the interval excludes 0)}.
    """
    best = best_model(col.eval, metric)
    models = {}
    for name, m in col.eval.items():
        if m:
            keys = EVAL_KEYS + [f"{k}_ci_{side}" for k in HEADLINE for side in ("low", "high")]
            models[name] = {k: m[k] for k in keys if k in m}
            models[name].update({f"{k}_reads_images": int(_reads_images(m, k)) for k in HEADLINE
                                 if f"{k}_minus_blind_ci_low" in m})
            models[name]["is_best"] = int(bool(best) and best[0] == name)
    out = {"best_value": best[1] if best else math.nan, "models_evaluated": len(models), "models": models}
    if top:
        iv = top[2]
        out["best_vs_runner_up"] = {"value": iv.value, "ci_low": iv.ci_low, "ci_high": iv.ci_high, "called": int(iv.called)}
    if effects:
        out["effects"] = {}
        for e in effects:
            iv = e.interval
            out["effects"].setdefault(e.name, {})[e.metric] = {
                "value": iv.value, "ci_low": iv.ci_low, "ci_high": iv.ci_high, "called": int(iv.called)}
    checks = merge_checks(col, tolerance)
    if checks:
        out["merged_vs_adapter"] = {n: {"max_abs_diff": c["max_abs_diff"], "within_tolerance": int(c["within_tolerance"])}
                                    for n, c in checks.items()}
    if not best:
        del out["best_value"]  # no evaluated model: nothing to report rather than a NaN
    return out
