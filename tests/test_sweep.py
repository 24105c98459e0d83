import json
import math
import runpy
import sys
from pathlib import Path

import pytest

from vlmlab.evaluate import sweep
from vlmlab.io import StageError

DATA = Path(__file__).parent / "data"


def test_replicates_from_exp_show_json():
    data = sweep.read(json.loads((DATA / "exp_show_handmade.json").read_text()))
    names = [r.name for r in data.replicates]
    assert names == ["main", "seed-one", "seed-two", "seed-two-again", "other-lr"]  # workspace left out
    assert data.skipped == ["queued-one: queued", "broken: failed"]
    groups = sweep.groups(data)
    # seed-two-again repeats seed 2 with the same params: the first listed stands; other-lr is another study
    assert [[r.name for r in g] for g in groups] == [["main", "seed-one", "seed-two"], ["other-lr"]]
    models, effects = sweep.summary_rows(groups[0], ["textvqa_acc"])
    base = next(r for r in models if r["model"] == "baseline")
    assert base["n"] == 3 and base["mean"] == pytest.approx(0.125) and base["sd"] == pytest.approx(0.01)
    data_eff = next(r for r in effects if r["effect"] == "data")
    assert data_eff["mean"] == pytest.approx(0.03) and data_eff["sd"] == pytest.approx(0.02)
    assert (data_eff["called"], data_eff["positive"], data_eff["n"]) == (2, 3, 3)
    assert sweep.mean_sd([1.0])[1] != sweep.mean_sd([1.0])[1]  # one seed: sd is NaN, shown as the mean alone


def test_report_command_writes_markdown_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sweep.py", "report", "--exp_json", str(DATA / "exp_show_handmade.json"),
                                      "--report", "reports/sweep.md", "--plot", "plots/sweep.png",
                                      "--paired", "False"])  # a JSON file alone: no predictions to pair
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "stages/sweep.py"), run_name="__main__")
    md = (tmp_path / "reports/sweep.md").read_text()
    assert "Seeds: 0, 1, 2 (3 replicates" in md and "## Params group 2" in md
    assert "| data | textvqa_acc | +0.0300 ± 0.0200 | 3/3 | 2/3 | 0: +0.0300, 1: +0.0100, 2: +0.0500 |" in md
    assert "| baseline | 0.1250 ± 0.0100 |" in md
    assert "Not used: queued-one: queued; broken: failed." in md and "![sweep](../plots/sweep.png)" in md
    assert (tmp_path / "plots/sweep.png").stat().st_size > 5000


def test_not_a_list_is_refused():
    with pytest.raises(SystemExit, match="expected a JSON list"):
        sweep.read({"rev": "workspace"})


def test_a_real_queued_sweep_of_the_small_profile():
    """`dvc exp show --json` (DVC 3.67) after `stages/sweep.py queue --seeds 1,2` on the small profile's repo
    (tests/test_pipeline.py); deps, outs and metrics other than compare.json trimmed to keep the file small."""
    shown = json.loads((DATA / "exp_show_small_profile.json").read_text())
    data = sweep.read(shown)
    assert sorted(r.seed for r in data.replicates) == [0, 1, 2] and data.skipped == []
    (group,) = sweep.groups(data)
    models, effects = sweep.summary_rows(group, ["cider", "textvqa_acc"])
    assert {r["model"] for r in models} == {"zoo", "baseline", "raw_lora_merged", "blip2_full", "blip2_lora",
                                            "blip2_lora_merged"}
    assert all(r["n"] == 3 for r in models + effects)
    assert {r["effect"] for r in effects} >= {"data", "strategy", "interaction"}
    assert "Seeds: 0, 1, 2 (3 replicates" in sweep.render(data, ["cider"])
    assert [r.name for r in sweep.read(shown, include_workspace=True).replicates][0] == "workspace"


def _state(name, params, metrics):
    return {"rev": name + "rev", "name": name, "data": {"params": {"params.yaml": {"data": params}},
                                                        "metrics": {k: {"data": v} for k, v in metrics.items()}}}


def _eval(cider, half, read=None):
    out = {"cider": cider, "cider_ci_low": cider - half, "cider_ci_high": cider + half}
    if read is not None:
        out |= {"cider_minus_blind": read, "cider_minus_blind_ci_low": read - half, "cider_minus_blind_ci_high": read + half}
    return out


def test_side_studies_teacher_seeds_and_stage1_dose():
    world, teacher = {"raw_size": 4000, "noise_rate": 0.35}, {"epochs": 12}

    def params(seed=0, **w):
        return {"seed": seed, "world": {**world, **w}, "teacher": teacher}

    def tmetrics(cider):
        return {"metrics/teacher.json": {"teacher_sampled": {"cider": cider, "bleu_4": 0.5}, "teacher_greedy": {"cider": 1.0}}}

    commit = _state("main", params(), {**tmetrics(0.9), "metrics/eval/baseline.json": _eval(0.40, 0.05)})
    exps = [_state("teacher-seed3", params(3), tmetrics(0.8)),
            _state("teacher-seed4", params(4), tmetrics(0.6)),
            _state("other-teacher", {**params(5), "teacher": {"epochs": 6}}, tmetrics(0.1)),  # another recipe: not a seed
            _state("dose-300", params(raw_size=300), {"metrics/eval/baseline.json": _eval(0.20, 0.05, read=0.02)}),
            _state("dose-1000", params(raw_size=1000), {"metrics/eval/baseline.json": _eval(0.30, 0.08, read=0.10)}),
            _state("dose-4000-accurate", params(noise_rate=0.0), {"metrics/eval/baseline.json": _eval(0.60, 0.05)})]
    commit["experiments"] = [{"revs": exps, "executor": None}]
    shown = [commit]
    rows = sweep.teacher_seeds(shown)
    assert [(r["seed"], r["sampled_cider"]) for r in rows] == [(0, 0.9), (3, 0.8), (4, 0.6)]
    doses = sweep.dose(shown)
    assert [[x["name"] for x in r["seeds"].values()] for r in doses] == [
        ["dose-300"], ["dose-1000"], ["main"], ["dose-4000-accurate"]]
    md = sweep.render_side_studies(rows, doses, ["cider"])
    assert "worst 0.6000, best 0.9000, worst/best 0.667" in md
    assert "| `dose-1000` | 1000 | 0.35 | 0.3000 [0.2200, 0.3800] ≈ |" in md       # overlaps dose-300's interval
    assert "| `dose-4000-accurate` | 4000 | 0.0 | 0.6000 [0.5500, 0.6500] ↑ |" in md  # wholly above main's
    assert "| `dose-300` | 300 | 0.35 | 0.0200 [-0.0300, 0.0700] |" in md   # seeing - blind: interval holds 0
    assert "| `dose-1000` | 1000 | 0.35 | **0.1000 [0.0200, 0.1800]** |" in md   # ... excludes 0: it reads
    assert "| `main` | 4000 | 0.35 |  |" in md                              # no blind control: an empty cell
    # side studies are no replicates of the study, not even skipped ones
    assert [x.split(":")[0] for x in sweep.read(shown).skipped] == ["main", "other-teacher"]


def test_dose_over_seeds_pairs_each_seed_with_its_reference():
    def params(seed=0, raw_size=4000, noise_rate=0.35, lr=1e-3):
        return {"seed": seed, "world": {"raw_size": raw_size, "noise_rate": noise_rate}, "train": {"stage1_lr": lr}}

    def ev(cider, read):
        return {"metrics/eval/baseline.json": _eval(cider, 0.05, read=read)}

    commit = _state("main", params(), ev(0.40, 0.00))
    exps = [_state("bold-seed", params(seed=1), ev(0.50, 0.10)),                    # the study's seed-1 replicate
            _state("dose-300-seed0", params(raw_size=300), ev(0.20, -0.10)),
            _state("dose-300-seed1", params(seed=1, raw_size=300), ev(0.45, 0.02)),
            _state("dose-4000-accurate-seed1", params(seed=1, noise_rate=0.0), ev(0.70, 0.20)),
            _state("teacher-seed2", params(seed=2), ev(0.40, 0.00)),     # teacher only: the commit's eval files
            _state("faster", params(seed=2, lr=1e-2), ev(0.90, 0.50))]   # another recipe: no dose of this one
    commit["experiments"] = [{"revs": exps, "executor": None}]
    doses = sweep.dose([commit])
    assert [(r["captions"], r["noise_rate"], list(r["seeds"])) for r in doses] == [
        (300, 0.35, [0, 1]), (4000, 0.35, [0, 1]), (4000, 0.0, [1])]
    md = sweep.render_side_studies([], doses, ["cider"])
    # 4000 vs 300 (amount): seed 0 [0.35, 0.45] above [0.15, 0.25]; seed 1 [0.45, 0.55] overlaps [0.40, 0.50]
    assert "| `main`, `bold-seed` | 4000 | 0.35 | 0.4500 ± 0.0707 ↑1/↓0 of 2 |" in md
    # accurate vs noisy at 4000 (quality): only seed 1 has both
    assert "| `dose-4000-accurate-seed1` | 4000 | 0.0 | 0.7000 (1 seed) ↑1/↓0 of 1 |" in md
    assert "| `dose-300-seed0`, `dose-300-seed1` | 300 | 0.35 | -0.0400 ± 0.0849, reads 0/2 |" in md
    assert "| `main`, `bold-seed` | 4000 | 0.35 | 0.0500 ± 0.0707, reads 1/2 |" in md


def test_dose_of_another_commit_only_where_this_commits_runs_score_the_same():
    def params(seed=0, raw_size=4000, teacher=1):
        return {"seed": seed, "world": {"raw_size": raw_size, "noise_rate": 0.35}, "teacher": {"v": teacher}}

    def commit(name, teacher, runs):
        c = _state(name, params(teacher=teacher), {"metrics/eval/baseline.json": _eval(0.40, 0.05)})
        c["experiments"] = [{"revs": [_state(n, params(teacher=teacher, **kw), {"metrics/eval/baseline.json": ev})
                                      for n, kw, ev in runs], "executor": None}]
        return [c]

    old = sweep.dose(commit("old", 1, [("dose-300", {"raw_size": 300}, _eval(0.20, 0.05)),
                                       ("old-seed1", {"seed": 1}, _eval(0.45, 0.05))]))
    same = sweep.dose(commit("new", 2, [("new-seed1", {"seed": 1}, _eval(0.45, 0.05))]))
    assert sweep.dose_of_another_commit(old, same) is old
    assert "queued from commit `abc1234`" in sweep.render_side_studies([], old, ["cider"], dose_rev="abc1234")
    moved = sweep.dose(commit("new", 2, [("new-seed1", {"seed": 1}, _eval(0.46, 0.05))]))
    with pytest.raises(StageError, match="`new-seed1` cider 0.46 != `old-seed1` 0.45 there"):
        sweep.dose_of_another_commit(old, moved)
    more = sweep.dose(commit("new", 2, [("new-seed2", {"seed": 2}, _eval(0.45, 0.05))]))
    with pytest.raises(StageError, match="seed 2 there"):
        sweep.dose_of_another_commit(old, more)
    # the same pipeline (dvc.lock) in both commits: a seed the other has no run of needs none; the rest are checked
    joined = sweep.dose_of_another_commit(old, more, same_pipeline=True)
    assert [sorted(r["seeds"]) for r in joined] == [[0], [0, 1, 2]]  # 300 captions; 4000 with this commit's seed 2
    with pytest.raises(StageError, match="`new-seed1` cider 0.46 != `old-seed1` 0.45 there"):
        sweep.dose_of_another_commit(old, moved, same_pipeline=True)


def test_only_keeps_one_recipes_experiments_from_every_commit():
    def params(seed, lr=1e-3, raw_size=4000):
        return {"seed": seed, "world": {"raw_size": raw_size, "noise_rate": 0.35}, "train": {"stage1_lr": lr}}

    def ev(cider):   # every experiment lists the compare.json and teacher.json of its commit, a dose run too
        return {"metrics/eval/baseline.json": _eval(cider, 0.05), "metrics/compare.json": {"models": {}, "effects": {}},
                "metrics/teacher.json": {"teacher_sampled": {"cider": cider, "bleu_4": 0.5}}}

    old, new = _state("c1", params(0), ev(0.4)), _state("c2", params(0), ev(0.4))
    old["experiments"] = [{"revs": [_state("fast-dose-4000-seed2", params(2, 1e-2), ev(0.4)),   # world of the study
                                    _state("fast-seed1", params(1, 1e-2), ev(0.6)),
                                    _state("fast-dose-300-seed1", params(1, 1e-2, 300), ev(0.3)),
                                    _state("other", params(1), ev(0.5))], "executor": None}]
    new["experiments"] = [{"revs": [_state("fast-seed0", params(0, 1e-2), ev(0.7))], "executor": None},
                          {"revs": [_state("fast-seed2", params(2, 1e-2), ev(0.9))], "executor": {"state": "running"}}]
    kept = sweep.only([old, new], "fast-")
    assert [s["name"] for s in kept] == ["dose-4000-seed2", "seed1", "dose-300-seed1", "seed0"]  # no commit row,
    assert [r.name for r in sweep.read(kept).replicates] == ["seed1", "seed0"]  # nothing unfinished; no dose run
    assert [r["name"] for r in sweep.teacher_seeds(kept)] == ["seed0", "seed1"]   # a dose run trains no teacher
    assert [(r["captions"], list(r["seeds"])) for r in sweep.dose(kept)] == [(300, [1]), (4000, [0, 1, 2])]


def test_dose_steps_pair_each_seed_and_pool_the_seeds():
    """A planted step is called (pooled and on each seed); an identical run is not; the pooled value is
    the mean of the per-seed paired differences."""
    import numpy as np

    from vlmlab.evaluate.bootstrap import Mean

    def params(seed=0, raw_size=4000):
        return {"seed": seed, "world": {"raw_size": raw_size, "noise_rate": 0.35}}

    states = [_state(f"dose-{size}-seed{s}", params(s, size), {"metrics/eval/baseline.json": _eval(0.4, 0.05)})
              for size in (300, 1000, 4000) for s in (0, 1)]
    commit = {**states[0], "experiments": [{"revs": states[1:], "executor": None}]}
    doses = sweep.dose([commit])
    rng = np.random.default_rng(0)
    keys = [(str(i), "p", 0) for i in range(300)]
    base = {s: (rng.random(300) < 0.3).astype(float) for s in (0, 1)}
    planted = {0: 60, 1: 40}  # questions turned right from 300 to 1000 captions: +0.2, +0.133

    def statistics(rev):
        size, seed = int(rev.split("-")[1]), int(rev.split("seed")[1][0])
        scores = base[seed].copy()
        if size >= 1000:
            wrong = np.flatnonzero(scores == 0)[:planted[seed]]
            scores[wrong] = 1.0
        return {"textvqa_acc": Mean(keys, scores)}

    steps = sweep.dose_steps(doses, statistics, ["textvqa_acc"], samples=500, seed=0, level=0.95)
    assert [(s["reference"]["captions"], s["row"]["captions"]) for s in steps] == [(300, 1000), (1000, 4000)]
    up, same = (s["metrics"]["textvqa_acc"] for s in steps)
    assert up["value"] == pytest.approx((60 + 40) / 300 / 2) and up["ci_low"] > 0
    assert all(i.ci_low > 0 for _, i in up["seeds"])
    assert same["value"] == 0 and same["ci_low"] == same["ci_high"] == 0
    md = sweep.render_side_studies([], doses, ["textvqa_acc"], steps=steps)
    assert "| 300 @ 0.35 → 1000 @ 0.35 | **+0.1667 [" in md and "↑2/↓0 of 2 |" in md
    assert "| 1000 @ 0.35 → 4000 @ 0.35 | +0.0000 [+0.0000, +0.0000] ↑0/↓0 of 2 |" in md
    # over two steps: 4000 against 300 only (1000's smallest set is its adjacent step, already above)
    spans = sweep.dose_steps(doses, statistics, ["textvqa_acc"], samples=500, seed=0, level=0.95,
                             reference=sweep.from_smallest)
    assert [(s["reference"]["captions"], s["row"]["captions"]) for s in spans] == [(300, 4000)]
    assert spans[0]["metrics"]["textvqa_acc"]["value"] == pytest.approx(up["value"])
    md = sweep.render_side_studies([], doses, ["textvqa_acc"], steps=steps, spans=spans)
    assert "From the smallest set" in md and "| 300 @ 0.35 → 4000 @ 0.35 | **+0.1667 [" in md
