"""Issue 11: no stuck runs, no lost files, no stale results, no silent typos.

One section per numbered problem of the issue; each test failed on the code before the fix.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from test_train import Interrupt, InterruptAt, base, data, train_lora, world  # noqa: F401  (fixtures)
from vlmlab import io
from vlmlab.train import recipe

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, io.StageError) and "\n" not in msg, msg
    return msg


def curves(plots: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((plots / "plots/metrics").glob("*.tsv"))}


@pytest.fixture(scope="module")
def reference(base, data, tmp_path_factory):
    """The uninterrupted LoRA run: weights, figures and dvclive curves."""
    plots = tmp_path_factory.mktemp("ref") / "plots"
    weights, figures = train_lora(base, data, plots.parent / "work", plots=plots)
    return weights, figures, curves(plots)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 1. a partial checkpoint

class DiskFull(OSError):
    pass


def test_a_kill_inside_checkpoint_writing_leaves_no_checkpoint_and_resume_goes_on(base, data, reference, tmp_path,
                                                                                  monkeypatch):
    from transformers import Trainer

    work = tmp_path / "work"
    original = Trainer._save_rng_state
    calls = {"n": 0}

    def dies_at_the_third_save(self, output_dir):  # stage 1 saves at steps 2, 4; the 3rd save is stage 2 step 2
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt("killed inside the checkpoint write")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_at_the_third_save)
    with pytest.raises(Interrupt):
        train_lora(base, data, work)
    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    # nothing named checkpoint-N that is not complete
    assert not list((work / "stage2").glob("checkpoint-*"))
    weights, figures = train_lora(base, data, work)
    assert same_weights(weights, reference[0])
    assert figures["stage2"]["resumed_from_step"] == 0 and figures["stage1"]["skipped"] == 1


def test_a_half_written_checkpoint_is_skipped_and_removed(base, data, reference, tmp_path, capsys):
    work = tmp_path / "work"
    with pytest.raises(Interrupt):  # stage 2 killed at step 7: its last checkpoint is step 6
        train_lora(base, data, work, [InterruptAt(stage=2, step=7)])
    # what a SIGINT inside transformers' in-place save leaves: weights, no trainer_state.json
    partial = work / "stage2" / "checkpoint-8"
    shutil.copytree(work / "stage2" / "checkpoint-6", partial)
    (partial / "trainer_state.json").unlink()
    weights, figures = train_lora(base, data, work)
    assert figures["stage2"]["resumed_from_step"] == 6
    assert same_weights(weights, reference[0])
    assert "checkpoint-8: incomplete checkpoint" in capsys.readouterr().out


# ---------------------------------------------------------------- 2. a failure after the last step; 8. metrics after a resume

def test_a_run_that_failed_after_its_last_step_finishes_from_its_final_checkpoint(base, data, reference, tmp_path):
    """As when saving models/runs/<run> hit a full disk: the re-run trains 0 steps and reports the run."""
    work = tmp_path / "work"
    train_lora(base, data, work)   # trained to the end; the stage died after this (save_trained)
    assert (work / "stage2" / "checkpoint-8" / "trainer_state.json").is_file()
    weights, figures = train_lora(base, data, work)
    assert figures["stage2"]["resumed_from_step"] == 8 and figures["stage2"]["steps"] == 8
    assert same_weights(weights, reference[0])
    for key in ("loss", "final_loss", "first_loss", "steps", "tokens"):
        assert figures["stage2"][key] == reference[1]["stage2"][key], key


def test_metrics_and_curves_after_a_resume_equal_an_uninterrupted_run(base, data, reference, tmp_path):
    work, plots = tmp_path / "work", tmp_path / "plots"
    with pytest.raises(Interrupt):
        train_lora(base, data, work, [InterruptAt(stage=1, step=3)], plots)
    with pytest.raises(Interrupt):
        train_lora(base, data, work, [InterruptAt(stage=2, step=7)], plots)
    shutil.rmtree(plots)  # `dvc repro` deletes a stage's outputs (the curves) before it re-runs it
    weights, figures = train_lora(base, data, work, plots=plots)
    assert figures["stage2"]["resumed_from_step"] == 6 and same_weights(weights, reference[0])
    for stage in ("stage1", "stage2"):
        for key in ("loss", "final_loss", "first_loss", "steps", "tokens"):
            assert figures[stage][key] == reference[1][stage][key], (stage, key)
    metrics = recipe.run_metrics(figures, {}, {}, {})
    assert metrics["train_loss"] == recipe.run_metrics(reference[1], {}, {}, {})["train_loss"]
    got, want = curves(plots), reference[2]
    for name in ("loss.tsv", "lr.tsv", "grad_norm.tsv", "stage.tsv"):
        assert got[name] == want[name], name
    assert [ln.split("\t")[0] for ln in got["samples_per_s.tsv"].splitlines()[1:]] == [str(s) for s in range(1, 13)]
