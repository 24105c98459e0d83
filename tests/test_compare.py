import json
import os
from pathlib import Path

import pytest
import yaml

from vlmlab.evaluate import compare as cmp

MODELS = {"baseline": "models/runs/baseline", "blip2_lora": "models/runs/blip2_lora",
          "blip2_lora_merged": "models/merged/blip2_lora"}


def put(root: Path, rel: str, obj) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def fake_tree(root: Path, with_lora: bool = True) -> None:
    """A pipeline's outputs as the stages write them; blip2_lora's optional."""
    put(root, "metrics/data/raw.json", {"samples": 10000, "rejects": {"total": 0}, "caption_words": {"mean": 3.77},
                                         "caption_chars": {"mean": 20.1}, "vocab_size": 89, "duplicate_caption_share": 0.85})
    put(root, "metrics/train/baseline.json", {"train_s": 120.5, "samples_per_s": 98.2, "tokens_per_s": 2500.0,
                                              "train_loss": 1.25, "final_loss": 1.1, "trainable": {"total": 700000},
                                              "monitor": {"wall_s": 130.0, "peak_rss_mb": 900.0}})
    put(root, "metrics/eval/baseline.json", {"textvqa_acc": 0.31, "bleu_1": 0.5, "bleu_2": 0.4, "bleu_3": 0.3,
                                             "bleu_4": 0.2, "cider": 0.8, "mmbench_acc": 0.4, "mmbench_circular_acc": 0.2,
                                             "questions_per_s": 50.0, "monitor": {"wall_s": 20.0, "peak_rss_mb": 800.0},
                                             "textvqa_by_type": {"ocr": 0.05, "color": 0.6}})
    put(root, "metrics/zoo.json", {"lm_perplexity": 3.1, "monitor": {"wall_s": 207.8, "peak_rss_mb": 3178.9}})
    put(root, "plots/train/baseline/plots/metrics/loss.tsv", "step\tloss\n1\t3.0\n2\t2.5\n")
    put(root, "plots/monitor/evaluate_baseline.csv", "t_s,rss_mb,cpu_pct,gpu_mem_mb,gpu_util_pct\n0.0,500,90,0.0,0.0\n0.5,800,95,0.0,0.0\n")
    if with_lora:
        put(root, "metrics/data/enhanced.json", {"samples": 30000, "caption_words": {"mean": 12.0}})
        put(root, "metrics/train/blip2_lora.json", {"train_s": 80.0, "trainable": {"total": 60000}})
        scores = {"textvqa_acc": 0.35, "bleu_1": 0.6, "bleu_2": 0.5, "bleu_3": 0.4, "bleu_4": 0.3, "cider": 1.2,
                  "mmbench_acc": 0.45, "mmbench_circular_acc": 0.25}
        put(root, "metrics/eval/blip2_lora.json", scores)
        put(root, "metrics/eval/blip2_lora_merged.json", {**scores, "cider": 1.21})


def test_best_model_and_merge_check(tmp_path):
    fake_tree(tmp_path)
    col = cmp.collect(tmp_path, ["raw", "enhanced"], ["baseline", "blip2_lora"], MODELS)
    assert cmp.best_model(col.eval, "cider") == ("blip2_lora_merged", 1.21)
    assert cmp.best_model(col.eval, "textvqa_acc")[1] == 0.35
    assert cmp.merged_pairs(MODELS) == [("blip2_lora_merged", "blip2_lora")]
    check = cmp.merge_checks(col, tolerance=0.02)["blip2_lora_merged"]
    assert check["max_abs_diff"] == pytest.approx(0.01) and check["within_tolerance"]
    assert not cmp.merge_checks(col, tolerance=0.001)["blip2_lora_merged"]["within_tolerance"]
    s = cmp.summary(col, "cider", 0.02)
    assert s["models"]["blip2_lora_merged"]["is_best"] == 1 and s["models"]["baseline"]["is_best"] == 0
    assert s["merged_vs_adapter"]["blip2_lora_merged"]["within_tolerance"] == 1


def test_absent_runs_are_reported_not_invented(tmp_path):
    fake_tree(tmp_path, with_lora=False)
    col = cmp.collect(tmp_path, ["raw", "enhanced"], ["baseline", "blip2_lora"], MODELS)
    md = cmp.render_markdown(col, "cider", 0.02, {})
    assert "| enhanced | absent |" in md and "| blip2_lora_merged | absent |" in md and "| blip2_lora | absent |" in md
    assert "`baseline` (0.8000)" in md and "3.7700" in md and "700,000" in md
    assert "Merged LoRA" not in md  # nothing to compare yet
    assert "| zoo | 207.8 | 3,178.9 |" in md  # other stages' peaks join the memory table
    assert "| model | color | ocr |\n|---|---|---|\n| baseline | 0.6000 | 0.0500 |" in md
    s = cmp.summary(col, "cider", 0.02)
    assert s["models_evaluated"] == 1 and set(s["models"]) == {"baseline"} and "merged_vs_adapter" not in s


def test_series_for_plots(tmp_path):
    fake_tree(tmp_path)
    assert cmp.loss_rows(tmp_path, ["baseline", "blip2_lora"]) == [
        {"step": 1, "loss": 3.0, "series": "baseline"}, {"step": 2, "loss": 2.5, "series": "baseline"}]
    mem = cmp.memory_rows(tmp_path)
    assert [r["memory_mb"] for r in mem] == [500.0, 800.0] and mem[0]["series"] == "evaluate_baseline"


def test_stage_end_to_end(tmp_path, monkeypatch):
    fake_tree(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())  # stages check the whole file
    params["evaluate"]["models"] = MODELS
    params["compare"] = {"metric": "cider", "datasets": ["raw", "enhanced"], "merge_tolerance": 0.02}
    put(tmp_path, "params.yaml", yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["compare.py", "--report", "reports/compare.md", "--metrics", "metrics/compare.json",
                                      "--plots", "plots/compare"])
    runpy.run_path(str(repo / "stages/compare.py"), run_name="__main__")
    md = (tmp_path / "reports/compare.md").read_text()
    assert "Best model by `cider`" in md and "![loss](../plots/compare/loss.png)" in md
    for name in ("metrics", "loss", "memory"):
        assert (tmp_path / f"plots/compare/{name}.png").stat().st_size > 1000
    assert (tmp_path / "plots/compare/metrics.csv").read_text().startswith("model,metric,value\n")
    assert json.loads((tmp_path / "metrics/compare.json").read_text())["models_evaluated"] == 3
    assert os.path.exists(tmp_path / "plots/compare/memory.csv")
