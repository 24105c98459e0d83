"""Stage `evaluate@<model>`: one trained (or merged) model on TextVQA, captioning and MMBench.

    python stages/evaluate.py --name baseline --model models/runs/baseline \
        --preds data/eval/baseline --metrics metrics/eval/baseline.json

Writes per-sample predictions (textvqa.jsonl, captions.jsonl, mmbench.jsonl) to `preds`,
flat metrics to `metrics` and memory over time to plots/monitor/evaluate_<name>.{csv,png}.
The benchmark files (tiny world by default, real ones by path) come from params `evaluate`.
"""
from __future__ import annotations

from vlmlab.determinism import pin; pin()  # noqa: E702  first: CPU kernels bit for bit on any x86 (vlmlab/determinism.py)
import fire
import torch

from vlmlab import io
from vlmlab.evaluate.benchmarks import GenConfig, run_captions, run_mmbench, run_textvqa
from vlmlab.infer import load_model
from vlmlab.monitor import Monitor
from vlmlab.seeding import seed_everything


def main(name: str, model: str, preds: str, metrics: str, params: str = "params.yaml"):
    all_params = io.load_params(params)
    p = all_params["evaluate"]
    seed_everything(all_params["seed"] + 600)  # greedy decoding draws nothing; seeded all the same
    if p["threads"]:
        torch.set_num_threads(p["threads"])
    cfg = GenConfig(**{k: p[k] for k in GenConfig.__dataclass_fields__ if k in p})

    with Monitor(f"plots/monitor/evaluate_{name}", p["monitor_interval"]) as mon:
        net, processor = load_model(model)
        net.eval()
        tv_rows, tv = run_textvqa(net, processor, p["textvqa_questions"], p["textvqa_annotations"],
                                  p["textvqa_images"], cfg)
        cap_rows, cap = run_captions(net, processor, p["captions"], p["caption_images"], cfg)
        mm_rows, mm = run_mmbench(net, processor, p["mmbench"], cfg)

    with io.atomic_path(preds) as tmp:
        tmp.mkdir()
        io.write_jsonl(tmp / "textvqa.jsonl", tv_rows)
        io.write_jsonl(tmp / "captions.jsonl", cap_rows)
        io.write_jsonl(tmp / "mmbench.jsonl", mm_rows)
    n = tv["textvqa_questions"] + cap["caption_images"] + mm["mmbench_rows"]
    result = {**tv, **cap, **mm, "questions_per_s": n / mon.peaks["wall_s"], "monitor": mon.peaks}
    flat = io.write_metrics(metrics, result)
    print(f"evaluate {name}: textvqa {tv['textvqa_acc']:.3f}  cider {cap['cider']:.3f}  bleu_4 {cap['bleu_4']:.3f}  "
          f"mmbench {mm['mmbench_acc']:.3f} (circular {mm['mmbench_circular_acc']:.3f})  "
          f"{flat['questions_per_s']:.1f} q/s")


if __name__ == "__main__":
    fire.Fire(main)
