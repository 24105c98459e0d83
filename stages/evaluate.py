"""Stage `evaluate@<model>`: one trained (or merged) model on TextVQA, captioning and MMBench.

    python stages/evaluate.py --name baseline --model models/runs/baseline \
        --preds data/eval/baseline --metrics metrics/eval/baseline.json

Writes per-sample predictions (textvqa.jsonl, captions.jsonl, mmbench.jsonl) to `preds`,
flat metrics to `metrics` (each headline metric with `<metric>_ci_low`/`_ci_high`, its
percentile bootstrap interval over the benchmark's items) and memory over time to
plots/monitor/evaluate_<name>.{csv,png}. With `evaluate.blind_control` every benchmark runs again
with one blank image for all (vlmlab/evaluate/blind.py): `<metric>_blind` and the paired
`<metric>_minus_blind` with its interval say whether the model reads its images at all
(blind predictions in `preds`/blind/).
The benchmark files (tiny world by default, real ones by path) come from params `evaluate`.
"""
from __future__ import annotations

import sys
from pathlib import Path

# this checkout's vlmlab before any installed copy: a clone or a `dvc exp run --temp` copy runs its own code
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmlab.determinism import pin; pin()  # noqa: E702  first: CPU kernels bit for bit on any x86 (vlmlab/determinism.py)

import fire
import torch

from vlmlab import io
from vlmlab.evaluate import blind, items
from vlmlab.evaluate.benchmarks import GenConfig, run_captions, run_mmbench, run_textvqa
from vlmlab.models.load import load_model
from vlmlab.monitor import Monitor
from vlmlab.params import load as load_params
from vlmlab.seeding import seed_everything


def run_benchmarks(net, processor, p: dict, cfg: GenConfig) -> tuple[dict[str, list[dict]], dict]:
    """The three benchmarks of params `evaluate`: ({benchmark: per-item rows}, their metrics in one dict)."""
    tv_rows, tv = run_textvqa(net, processor, p["textvqa_questions"], p["textvqa_annotations"], p["textvqa_images"], cfg)
    cap_rows, cap = run_captions(net, processor, p["captions"], p["caption_images"], cfg)
    mm_rows, mm = run_mmbench(net, processor, p["mmbench"], cfg)
    return {"textvqa": tv_rows, "captions": cap_rows, "mmbench": mm_rows}, {**tv, **cap, **mm}


def main(name: str, model: str, preds: str, metrics: str, params: str = "params.yaml", monitor: str = ""):
    all_params = load_params(params)
    p = all_params["evaluate"]
    seed_everything(all_params["seed"] + 600)  # greedy decoding draws nothing; seeded all the same
    if p["threads"]:
        torch.set_num_threads(p["threads"])
    cfg = GenConfig(**{k: p[k] for k in GenConfig.__dataclass_fields__ if k in p})

    with Monitor(monitor or f"plots/monitor/evaluate_{name}", p["monitor_interval"]) as mon:
        net, processor = load_model(model)
        net.eval()
        seen_rows, scores = run_benchmarks(net, processor, p, cfg)
        passes = {".": seen_rows}
        if p["blind_control"]:
            blind.blank_images(processor)
            passes["blind"], _ = run_benchmarks(net, processor, p, cfg)

    with io.atomic_path(preds) as tmp:
        for folder, rows_of in passes.items():
            (tmp / folder).mkdir(parents=True)
            for bench, rows in rows_of.items():
                io.write_jsonl(tmp / folder / f"{bench}.jsonl", rows)
    n = len(passes) * (scores["textvqa_questions"] + scores["caption_images"] + scores["mmbench_rows"])
    result = {**scores, "questions_per_s": n / mon.peaks["wall_s"], "monitor": mon.peaks}
    stats = items.statistics(seen_rows)
    boot = p["bootstrap_samples"], p["bootstrap_seed"], p["ci_level"]
    for metric, ci in items.intervals(stats, *boot).items():
        if abs(ci.value - result[metric]) > 1e-9:  # the resampled statistic must be the metric itself
            raise io.fail(f"{metric}: bootstrap statistic {ci.value!r} != scored {result[metric]!r}")
        result[f"{metric}_ci_low"], result[f"{metric}_ci_high"] = ci.ci_low, ci.ci_high
    if p["blind_control"]:
        result.update(blind.seeing_minus_blind(stats, items.statistics(passes["blind"]), *boot))
    flat = io.write_metrics(metrics, result)
    shown = "  ".join(f"{k} {flat[k]:.3f} [{flat[k + '_ci_low']:.3f}, {flat[k + '_ci_high']:.3f}]"
                      + (f" (blind {flat[k + '_blind']:.3f})" if p["blind_control"] else "") for k in stats)
    print(f"evaluate {name}: {shown}  {flat['questions_per_s']:.1f} q/s")


if __name__ == "__main__":
    fire.Fire(main)
