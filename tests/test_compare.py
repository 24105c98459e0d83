import json
import os
from pathlib import Path

import pytest
import yaml

from vlmlab.evaluate import compare as cmp
from vlmlab.evaluate import compare_plots as cplots
from vlmlab.evaluate import factorial, items
from vlmlab.io import StageError

MODELS = {"baseline": "models/runs/baseline", "raw_lora_merged": "models/merged/raw_lora",
          "blip2_full": "models/runs/blip2_full", "blip2_lora": "models/runs/blip2_lora",
          "blip2_lora_merged": "models/merged/blip2_lora"}
RUNS = {"baseline": {"data": "raw", "strategy": "full"}, "raw_lora": {"data": "raw", "strategy": "lora"},
        "blip2_full": {"data": "enhanced", "strategy": "full"}, "blip2_lora": {"data": "enhanced", "strategy": "lora"}}
BOOT = cmp.Bootstrap(samples=500, seed=0, level=0.95)
LEVELS = (["raw", "enhanced"], ["full", "lora"])


def put(root: Path, rel: str, obj) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def put_predictions(root: Path, model: str, textvqa_right: int, caption_hits: int = 0, extra: dict | None = None) -> None:
    """data/eval/<model>/ as evaluate writes it, and metrics/eval/<model>.json computed from it.

    120 TextVQA questions of which the first `textvqa_right` are answered right; 40 caption images,
    the first `caption_hits` captioned with their first reference; 30 MMBench questions x 2 rotations.
    """
    tv = [{"question_id": i // 2, "prompt": f"what is {i}?", "text": "x", "answers": ["a"] * 10,
           "score": float(i < textvqa_right)} for i in range(120)]
    refs = [[f"a {c} square on the left", f"the {c} square", f"one {c} square next to a circle"]
            for c in ["red", "blue", "green", "big", "small"] * 8]
    cap = [{"id": f"img{i}", "image": f"{i}.png", "prompt": "Describe.", "references": r,
            "text": r[0] if i < caption_hits else "a square"} for i, r in enumerate(refs)]
    mm = [{"index": q + k * 1_000_000, "category": "color", "prompt": "p", "text": "A", "answer": "A",
           "pred": "A" if q % 3 == 0 else "B"} for q in range(30) for k in range(2)]
    for name, rows in (("textvqa", tv), ("captions", cap), ("mmbench", mm)):
        put(root, f"data/eval/{model}/{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    stats = items.statistics({"textvqa": tv, "captions": cap, "mmbench": mm})
    metrics = {"bleu_1": 0.5, "bleu_2": 0.4, "bleu_3": 0.3, "questions_per_s": 50.0, **(extra or {})}
    for k, iv in items.intervals(stats, BOOT.samples, BOOT.seed, BOOT.level).items():
        metrics.update({k: iv.value, f"{k}_ci_low": iv.ci_low, f"{k}_ci_high": iv.ci_high})
    put(root, f"metrics/eval/{model}.json", metrics)


def fake_tree(root: Path, with_lora: bool = True) -> None:
    """A pipeline's outputs as the stages write them; the enhanced LoRA cell's optional.

    Planted: enhanced data answers 20 more TextVQA questions (of 120) under both strategies;
    the strategy changes nothing; captions and MMBench are the same for every model.
    """
    put(root, "metrics/data/raw.json", {"samples": 10000, "rejects": {"total": 0}, "caption_words": {"mean": 3.77},
                                         "caption_chars": {"mean": 20.1}, "vocab_size": 89, "duplicate_caption_share": 0.85})
    put(root, "metrics/train/baseline.json", {"train_s": 120.5, "samples_per_s": 98.2, "tokens_per_s": 2500.0,
                                              "train_loss": 1.25, "final_loss": 1.1, "trainable": {"total": 700000},
                                              "monitor": {"wall_s": 130.0, "peak_rss_mb": 900.0}})
    put_predictions(root, "baseline", 40, extra={"monitor": {"wall_s": 20.0, "peak_rss_mb": 800.0},
                                                 "textvqa_by_type": {"ocr": 0.05, "color": 0.6}})
    put_predictions(root, "raw_lora_merged", 40)
    put_predictions(root, "blip2_full", 60)
    put(root, "metrics/zoo.json", {"lm_perplexity": 3.1, "monitor": {"wall_s": 207.8, "peak_rss_mb": 3178.9}})
    put(root, "plots/train/baseline/plots/metrics/loss.tsv", "step\tloss\n1\t3.0\n2\t2.5\n")
    put(root, "plots/monitor/evaluate_baseline.csv", "t_s,rss_mb,cpu_pct,gpu_mem_mb,gpu_util_pct\n0.0,500,90,0.0,0.0\n0.5,800,95,0.0,0.0\n")
    if with_lora:
        put(root, "metrics/data/enhanced.json", {"samples": 30000, "caption_words": {"mean": 12.0}})
        put(root, "metrics/train/blip2_lora.json", {"train_s": 80.0, "trainable": {"total": 60000}})
        put_predictions(root, "blip2_lora", 61, caption_hits=10)  # the adapter: one answer off its merge
        put_predictions(root, "blip2_lora_merged", 60, caption_hits=10)


def test_best_model_and_merge_check(tmp_path):
    fake_tree(tmp_path)
    col = cmp.collect(tmp_path, ["raw", "enhanced"], list(RUNS), MODELS)
    assert cmp.best_model(col.eval, "textvqa_acc") == ("blip2_lora", 61 / 120)
    assert cmp.merged_pairs(MODELS) == [("blip2_lora_merged", "blip2_lora")]  # raw_lora: merged model only
    check = cmp.merge_checks(col, tolerance=0.02)["blip2_lora_merged"]
    assert check["max_abs_diff"] == pytest.approx(1 / 120) and check["within_tolerance"]
    assert not cmp.merge_checks(col, tolerance=0.001)["blip2_lora_merged"]["within_tolerance"]
    s = cmp.summary(col, "textvqa_acc", 0.02)
    assert s["models"]["blip2_lora"]["is_best"] == 1 and s["models"]["baseline"]["is_best"] == 0
    assert s["merged_vs_adapter"]["blip2_lora_merged"]["within_tolerance"] == 1
    assert s["models"]["baseline"]["textvqa_acc_ci_low"] < 1 / 3 < s["models"]["baseline"]["textvqa_acc_ci_high"]
    # one answer apart on 120 questions: the top two are not told apart
    top = cmp.best_and_runner_up(col, "textvqa_acc", BOOT)
    assert top[:2] == ("blip2_lora", "blip2_lora_merged") and not top[2].called
    md = cmp.render_markdown(col, "textvqa_acc", 0.02, {}, boot=BOOT, top=top)
    assert "no significant difference from the runner-up `blip2_lora_merged`" in md


def test_cells_come_from_params_not_names():
    runs = {"a": {"data": "raw", "strategy": "full"}, "b": {"data": "raw", "strategy": "lora"},
            "c": {"data": "enhanced", "strategy": "full"}, "d": {"data": "enhanced", "strategy": "lora"}}
    models = {"A": "models/runs/a", "B": "models/runs/b", "B_m": "models/merged/b", "C": "models/runs/c",
              "D": "models/runs/d/"}
    cells, why = factorial.cells(runs, models, *LEVELS)
    assert why == "" and cells == {("raw", "full"): "A", ("raw", "lora"): "B_m", ("enhanced", "full"): "C",
                                   ("enhanced", "lora"): "D"}  # the merged model stands for its LoRA run
    w = factorial.contrasts(cells, *LEVELS)
    assert w["data"] == {"C": 0.5, "A": -0.5, "D": 0.5, "B_m": -0.5}
    assert w["interaction"] == {"D": 1.0, "B_m": -1.0, "C": -1.0, "A": 1.0}
    assert w["strategy_in_enhanced"] == {"D": 1.0, "C": -1.0}
    cells, why = factorial.cells({**runs, "e": {"data": "raw", "strategy": "full"}}, {**models, "E": "models/runs/e"},
                                 *LEVELS)
    assert cells is None and "data=raw, strategy=full has 2 runs (A, E)" in why
    cells, why = factorial.cells({k: v for k, v in runs.items() if k != "d"}, models, *LEVELS)
    assert cells is None and "data=enhanced, strategy=lora has no evaluated run" in why


def test_factor_effects_find_the_planted_data_effect_only(tmp_path):
    fake_tree(tmp_path)
    col = cmp.collect(tmp_path, ["raw", "enhanced"], list(RUNS), MODELS)
    effects, note = cmp.factor_effects(col, RUNS, *LEVELS, BOOT)
    got = {(e.name, e.metric): e for e in effects}
    data = got["data", "textvqa_acc"]
    assert note == "" and data.interval.value == pytest.approx(20 / 120) and data.interval.called
    assert data.verdict == "enhanced better" and data.interval.ci_low > 0
    for name in ("strategy", "interaction", "strategy_in_raw"):
        iv = got[name, "textvqa_acc"].interval
        assert (iv.value, iv.ci_low, iv.ci_high) == (0.0, 0.0, 0.0) and got[name, "textvqa_acc"].verdict == "no significant difference"
    # captions: only the enhanced LoRA cell copies references for 10 of 40 images -> interaction, CIDEr up
    assert got["interaction", "cider"].interval.called and got["interaction", "cider"].interval.value > 0
    assert not got["data_in_full", "cider"].interval.called
    assert all(not e.interval.called for e in effects if e.metric.startswith("mmbench"))
    s = cmp.summary(col, "cider", 0.02, effects)
    assert s["effects"]["data"]["textvqa_acc"]["called"] == 1 and s["effects"]["strategy"]["textvqa_acc"]["called"] == 0
    assert set(s["effects"]["data"]) == set(items.HEADLINE)
    md = cmp.render_markdown(col, "cider", 0.02, {}, effects, note, BOOT, None, cmp.cells_line(RUNS, MODELS, *LEVELS))
    assert "| data | textvqa_acc | +0.1667 |" in md and "| enhanced better |" in md
    assert "| strategy | textvqa_acc | +0.0000 | [+0.0000, +0.0000] | no significant difference |" in md
    assert "raw × lora = `raw_lora_merged`" in md
    assert "| baseline | 0.3333 [" in md  # headline metrics carry their interval


def test_absent_runs_are_reported_not_invented(tmp_path):
    fake_tree(tmp_path, with_lora=False)
    col = cmp.collect(tmp_path, ["raw", "enhanced"], list(RUNS), MODELS)
    effects, note = cmp.factor_effects(col, RUNS, *LEVELS, BOOT)
    assert effects == [] and "no per-item results for blip2_lora_merged" in note
    md = cmp.render_markdown(col, "cider", 0.02, {}, effects, note, BOOT)
    assert "| enhanced | absent |" in md and "| blip2_lora_merged | absent |" in md and "| blip2_lora | absent |" in md
    assert f"Not estimated: {note}." in md and "3.7700" in md and "700,000" in md
    assert "Merged LoRA" not in md  # nothing to compare yet
    assert "| zoo | 207.8 | 3,178.9 |" in md  # other stages' peaks join the memory table
    assert "| baseline | 0.6000 | 0.0500 |" in md  # per-type table
    s = cmp.summary(col, "cider", 0.02, effects)
    assert s["models_evaluated"] == 3 and "blip2_lora" not in s["models"] and "merged_vs_adapter" not in s
    assert "effects" not in s


def test_models_scored_on_different_items_stop_the_comparison(tmp_path):
    fake_tree(tmp_path)
    rows = (tmp_path / "data/eval/blip2_full/textvqa.jsonl").read_text().splitlines()
    (tmp_path / "data/eval/blip2_full/textvqa.jsonl").write_text("\n".join(rows[:-1]) + "\n")  # limit differs
    col = cmp.collect(tmp_path, ["raw", "enhanced"], list(RUNS), MODELS)
    with pytest.raises(StageError, match="blip2_full and baseline were evaluated on different textvqa items"):
        cmp.factor_effects(col, RUNS, *LEVELS, BOOT)


def test_series_for_plots(tmp_path):
    fake_tree(tmp_path)
    assert cplots.loss_rows(tmp_path, ["baseline", "blip2_lora"]) == [
        {"step": 1, "loss": 3.0, "series": "baseline"}, {"step": 2, "loss": 2.5, "series": "baseline"}]
    mem = cplots.memory_rows(tmp_path)
    assert [r["memory_mb"] for r in mem] == [500.0, 800.0] and mem[0]["series"] == "evaluate_baseline"
    col = cmp.collect(tmp_path, ["raw", "enhanced"], list(RUNS), MODELS)
    rows = {(r["model"], r["metric"]): r for r in cplots.eval_rows(col)}
    assert rows["baseline", "bleu_1"]["ci_low"] == "" and rows["baseline", "cider"]["ci_low"] <= rows["baseline", "cider"]["value"]


def test_stage_end_to_end(tmp_path, monkeypatch):
    fake_tree(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())  # stages check the whole file
    params["evaluate"]["models"] = MODELS
    params["evaluate"]["bootstrap_samples"] = 200
    put(tmp_path, "params.yaml", yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["compare.py", "--report", "reports/compare.md", "--metrics", "metrics/compare.json",
                                      "--plots", "plots/compare", "--preds", "data/eval"])
    runpy.run_path(str(repo / "stages/compare.py"), run_name="__main__")
    md = (tmp_path / "reports/compare.md").read_text()
    assert "Highest `cider`" in md and "![loss](../plots/compare/loss.png)" in md and "![effects](" in md
    for name in ("metrics", "loss", "memory", "effects"):
        assert (tmp_path / f"plots/compare/{name}.png").stat().st_size > 1000
    assert (tmp_path / "plots/compare/metrics.csv").read_text().startswith("model,metric,value,ci_low,ci_high\n")
    assert (tmp_path / "plots/compare/effects.csv").read_text().startswith("effect,metric,value,ci_low,ci_high,called\n")
    out = json.loads((tmp_path / "metrics/compare.json").read_text())
    assert out["models_evaluated"] == 5 and out["effects"]["data"]["textvqa_acc"]["called"] == 1
    assert os.path.exists(tmp_path / "plots/compare/memory.csv")


def test_blind_control_is_reported_per_model(tmp_path):
    from vlmlab.evaluate.blind import seeing_minus_blind

    fake_tree(tmp_path)
    seen = items.load_statistics(tmp_path / "data/eval/blip2_full")  # 60 of 120 right
    blind = items.load_statistics(tmp_path / "data/eval/baseline")   # 40 of 120: what it gets without images
    m = json.loads((tmp_path / "metrics/eval/blip2_full.json").read_text())
    m.update(seeing_minus_blind(seen, blind, BOOT.samples, BOOT.seed, BOOT.level))
    put(tmp_path, "metrics/eval/blip2_full.json", m)
    col = cmp.collect(tmp_path, ["raw", "enhanced"], list(RUNS), MODELS)
    s = cmp.summary(col, "cider", 0.02)
    assert s["models"]["blip2_full"]["textvqa_acc_reads_images"] == 1
    assert s["models"]["blip2_full"]["cider_reads_images"] == 0  # same captions seeing and blind
    assert "textvqa_acc_reads_images" not in s["models"]["baseline"]  # no blind control: nothing claimed
    md = cmp.render_markdown(col, "cider", 0.02, {}, boot=BOOT)
    row = next(line for line in md.splitlines() if line.startswith("| blip2_full | +0.1667"))
    assert row.count("**reads**") == 1 and "| baseline |" not in md.split("## Blind control")[1].split("##")[0]
