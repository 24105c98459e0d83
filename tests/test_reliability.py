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


# ---------------------------------------------------------------- 3. outputs never replace what is not theirs; 8. stale rejects, read-only

from test_infer import folders  # noqa: E402,F401  (a tiny base model + images)
from conftest import write_bomb_png  # noqa: E402
from vlmlab import infer  # noqa: E402


def questions_file(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else json.dumps(ln).encode()) + b"\n" for ln in lines))
    return path


def test_infer_out_that_is_an_existing_folder_is_refused_and_survives(folders, tmp_path):
    root, base, _, _ = folders
    mine = tmp_path / "results"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "notes.txt").write_text("keep me")
    run = subprocess.run([PY, "-m", "vlmlab.infer", "--model", str(base), "--image", str(root / "img0.jpg"),
                          "--question", "what ?", "--out", str(mine)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (f"error: --out {mine} is a folder: give a file path "
                                                   f"(e.g. {mine / 'answers.jsonl'}); nothing was written")
    assert (mine / "sub" / "notes.txt").read_text() == "keep me"
    # the library's own atomic writer never swaps a folder for a file either
    with pytest.raises(SystemExit) as e:
        io.write_jsonl(mine, [{"a": 1}])
    assert "is a folder" in one_line(e) and (mine / "sub" / "notes.txt").is_file()


def test_a_rerun_to_the_same_out_keeps_no_stale_rejects(folders, tmp_path):
    root, base, _, _ = folders
    out = tmp_path / "a.jsonl"
    good = {"question_id": 1, "image": "img0.jpg", "text": "what ?"}
    q = questions_file(tmp_path / "q.jsonl", [good, {"question_id": 2, "image": "gone.jpg", "text": "what ?"}])
    infer.main(str(base), questions=str(q), image_root=str(root), out=str(out), max_new_tokens=2)
    assert len(io.read_jsonl(f"{out}.rejects.jsonl")) == 1
    questions_file(q, [good])
    infer.main(str(base), questions=str(q), image_root=str(root), out=str(out), max_new_tokens=2)
    assert io.read_jsonl(f"{out}.rejects.jsonl") == [] and len(io.read_jsonl(out)) == 1


def test_an_unwritable_out_is_one_line_before_the_model_loads(folders, tmp_path, monkeypatch):
    import errno
    import tempfile

    root, base, _, _ = folders

    def read_only(*a, **kw):  # root ignores chmod: a read-only mount is what a test can stand in for
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(infer, "load_model", lambda *a, **kw: pytest.fail("the model loaded before --out was checked"))
    with pytest.raises(SystemExit) as e:
        infer.main(str(base), image=str(root / "img0.jpg"), question="what ?", out=str(tmp_path / "ro" / "a.jsonl"))
    assert one_line(e) == (f"error: {tmp_path / 'ro' / 'a.jsonl'}: cannot write it (Read-only file system); "
                           "free space or pick a writable place, then re-run (nothing was replaced)")


def test_a_full_disk_while_writing_is_one_line_and_keeps_the_previous_output(tmp_path):
    import errno

    target = tmp_path / "model"
    io.write_text(target / "config.json", "{}")
    with pytest.raises(SystemExit) as e:
        with io.atomic_path(target) as tmp:
            tmp.mkdir()
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "model: cannot write it (No space left on device)" in one_line(e)
    assert (target / "config.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------- 6. infer's options and question lines; 7. bombs

@pytest.mark.parametrize("option, value, message", [
    ("batch_size", -1, "--batch_size -1 (int): must be an integer >= 1"),
    ("batch_size", 0, "--batch_size 0 (int): must be an integer >= 1"),
    ("max_new_tokens", "8", "--max_new_tokens '8' (str): must be an integer >= 1"),
    ("question", 42, "--question 42 (int): must be text"),
    ("temperature", 0, "--temperature 0 (int): must be a number > 0"),
    ("device", "gpu", "--device 'gpu' (str): use cpu, cuda or cuda:N"),
])
def test_bad_infer_options_are_one_line_before_the_model_loads(folders, monkeypatch, option, value, message):
    root, base, _, _ = folders
    monkeypatch.setattr(infer, "load_model", lambda *a, **kw: pytest.fail("the model loaded before the options were checked"))
    kw = {"image": str(root / "img0.jpg"), "question": "what ?", option: value}
    with pytest.raises(SystemExit) as e:
        infer.main(str(base), **kw)
    assert one_line(e).startswith(f"error: {message}")


def test_bad_question_lines_and_a_bomb_become_rejects_with_line_numbers(folders, tmp_path):
    root, base, _, _ = folders
    write_bomb_png(tmp_path / "bomb.png")
    q = questions_file(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": str(root / "img0.jpg"), "text": "what ?"},
        {"question_id": 2, "image": 5, "text": "what ?"},
        b'{"question_id": 3, "image": "img1.jpg", "text": "caf\xe9 ?"}',
        {"question_id": 4, "image": str(tmp_path / "bomb.png"), "text": "what ?"},
        {"question_id": 5, "image": str(root / "img2.jpg"), "text": ["what", "?"]},
        {"question_id": 6, "image": str(root / "img1.jpg"), "text": "what ?"},
    ])
    out = tmp_path / "a.jsonl"
    infer.main(str(base), questions=str(q), out=str(out), max_new_tokens=2)
    assert [r["question_id"] for r in io.read_jsonl(out)] == [1, 6]
    rejects = io.read_jsonl(f"{out}.rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "bad_schema"), (3, "non_utf8"), (4, "image_too_large"),
                                                           (5, "bad_schema")]
    assert "exceeds limit" in rejects[2]["detail"]


def test_a_bomb_in_a_seed_folder_is_one_reject_and_the_rest_imported(tmp_path):
    from vlmlab.data.validate import import_seed

    src = tmp_path / "seed"
    rows = []
    for i in range(4):
        name = "images/bomb.png" if i == 2 else f"images/{i}.jpg"
        if i == 2:
            write_bomb_png(src / name)
        else:
            (src / "images").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(src / name)
        rows.append({"id": str(i), "text": f"<__dj__image>\nscene {i} <|__dj__eoc|>", "images": [name]})
    (src / "seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = import_seed(src, "seed.jsonl", "", tmp_path / "raw", seed=0)
    assert counts["samples"] == 3 and counts["rejects"]["image_too_large"] == 1 and counts["rejects"]["total"] == 1
    (reject,) = io.read_jsonl(tmp_path / "raw" / "rejects.jsonl")
    assert reject["line"] == 3 and reject["reason"] == "image_too_large" and "images/bomb.png" in reject["detail"]
    assert [r["id"] for r in io.read_jsonl(tmp_path / "raw" / "dj.jsonl")] == ["0", "1", "3"]
