"""One model's per-item results as bootstrap statistics, one per headline metric.

`evaluate` writes per-sample rows (data/eval/<model>/{textvqa,captions,mmbench}.jsonl).
Each benchmark is resampled by its own unit, so that an interval reflects the items a
benchmark really has:
- TextVQA: questions (the mean of per-question soft scores);
- captions: images (BLEU-4 and CIDEr-D recomputed on the resampled corpus);
- MMBench: questions, all rotations of one question together (single-pass and circular).
The keys of the units make two models' results pairable: `compare` resamples the same
keys for every model.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from vlmlab import io
from vlmlab.evaluate import mmbench
from vlmlab.evaluate.bootstrap import Interval, Mean, Statistic, interval, resample_counts
from vlmlab.evaluate.caption_corpus import caption_statistics

# headline metric -> the benchmark (predictions file stem) whose units it resamples
HEADLINE = {"textvqa_acc": "textvqa", "cider": "captions", "bleu_4": "captions",
            "mmbench_acc": "mmbench", "mmbench_circular_acc": "mmbench"}
BENCHMARKS = ["textvqa", "captions", "mmbench"]


def textvqa_statistics(rows: list[dict]) -> dict[str, Statistic]:
    """Rows {"question_id", "prompt", "score"}: a question is keyed by id, prompt and repeat number."""
    seen: Counter = Counter()
    keys = []
    for r in rows:
        k = (str(r["question_id"]), r["prompt"])
        keys.append((*k, seen[k]))
        seen[k] += 1
    return {"textvqa_acc": Mean(keys, [r["score"] for r in rows])}


def caption_item_statistics(rows: list[dict]) -> dict[str, Statistic]:
    """Rows {"id", "text", "references"}: an image is keyed by its id."""
    return caption_statistics([str(r["id"]) for r in rows], [r["text"] for r in rows],
                              [r["references"] for r in rows])


def mmbench_statistics(rows: list[dict]) -> dict[str, Statistic]:
    """Rows {"index", "category", "answer", "pred"}: a question group is keyed by index % 1e6."""
    groups = mmbench.group_outcomes(rows)
    keys = [g["group"] for g in groups]
    return {"mmbench_acc": Mean(keys, [float(g["first"]) for g in groups]),
            "mmbench_circular_acc": Mean(keys, [float(g["circular"]) for g in groups])}


BUILDERS = {"textvqa": textvqa_statistics, "captions": caption_item_statistics, "mmbench": mmbench_statistics}


def statistics(rows: dict[str, list[dict]]) -> dict[str, Statistic]:
    """{benchmark: prediction rows} -> {headline metric: Statistic} for the benchmarks given."""
    out = {}
    for bench, bench_rows in rows.items():
        if bench_rows:
            out.update(BUILDERS[bench](bench_rows))
    return out


def load_statistics(folder: str | Path) -> dict[str, Statistic] | None:
    """The headline statistics of one model's predictions folder; None when the folder is absent."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    missing = [b for b in BENCHMARKS if not (folder / f"{b}.jsonl").is_file()]
    if missing:
        raise io.fail(f"{folder}: no {missing[0]}.jsonl; re-run the evaluate stage that writes this folder")
    return statistics({b: io.read_jsonl(folder / f"{b}.jsonl") for b in BENCHMARKS})


def resamples(stats: dict[str, Statistic], samples: int, seed: int) -> dict[str, np.ndarray]:
    """Counts per metric, drawn once per benchmark: metrics of one benchmark share their resamples."""
    by_size: dict[tuple[str, int], np.ndarray] = {}
    out = {}
    for metric, stat in stats.items():
        key = (HEADLINE[metric], len(stat.keys))
        if key not in by_size:
            by_size[key] = resample_counts(len(stat.keys), samples, seed)
        out[metric] = by_size[key]
    return out


def intervals(stats: dict[str, Statistic], samples: int, seed: int, level: float) -> dict[str, Interval]:
    """Each headline metric with its percentile bootstrap interval."""
    counts = resamples(stats, samples, seed)
    return {m: interval(s, counts[m], level) for m, s in stats.items()}


def align(stats: dict[str, dict[str, Statistic]], metric: str) -> dict[str, Statistic]:
    """The models' statistics of `metric`, checked to be scored on the same units and put in one order.

    Models scored on different item sets cannot be paired: that stops with a clear line.
    """
    present = {m: s[metric] for m, s in stats.items() if s and metric in s}
    if not present:
        return {}
    first, ref = next(iter(present.items()))
    order = list(ref.keys)
    for model, stat in present.items():
        if sorted(map(repr, stat.keys)) != sorted(map(repr, order)):
            raise io.fail(f"{model} and {first} were evaluated on different {HEADLINE[metric]} items; "
                          f"evaluate every model on the same files with the same evaluate.limit")
        if list(stat.keys) != order:
            raise io.fail(f"{model}: {HEADLINE[metric]} items in another order than {first}'s; "
                          f"re-run its evaluate stage")
    return present


def resample_counts_for(stats: dict[str, Statistic], samples: int, seed: int) -> np.ndarray:
    """One set of resamples for models aligned on the same units (the draws `intervals` makes for each)."""
    return resample_counts(len(next(iter(stats.values())).keys), samples, seed)
