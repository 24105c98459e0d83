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
from conftest import imports_in, write_bomb_png  # noqa: E402
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
    # nor is the question file replaced by its answers
    q = questions_file(tmp_path / "q.jsonl", [{"question_id": 1, "image": str(root / "img0.jpg"), "text": "what ?"}])
    before = q.read_bytes()
    with pytest.raises(SystemExit) as e:
        infer.main(str(base), questions=str(q), out=str(q))
    assert "is the --questions file" in one_line(e) and q.read_bytes() == before


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


# ---------------------------------------------------------------- 6. silent parameter problems

from vlmlab import params as schema  # noqa: E402

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def with_change(section: str, key: str, value, params=None) -> dict:
    p = json.loads(json.dumps(params or PARAMS))
    node = p
    *parents, last = [section, *key.split(".")] if key else [section]
    for part in parents:
        node = node[part]
    node[last] = value
    return p


def sections_with_keys():
    for section, value in PARAMS.items():
        if isinstance(value, dict):
            yield section


def test_params_yaml_passes_its_own_schema():
    assert schema.validate(PARAMS) == schema.validate(json.loads(json.dumps(PARAMS)))
    assert set(schema.SECTIONS) == set(PARAMS)


@pytest.mark.parametrize("section", list(sections_with_keys()))
def test_a_misspelt_key_in_every_section_is_one_line_naming_it(section):
    if section == "runs":   # runs' names are free: a misspelt key inside a run
        params, key = with_change("runs", "baseline.lrr", 1e-3), "runs.baseline.lrr"
    elif section == "evaluate":
        params, key = with_change(section, "batch_sizee", 8), "evaluate.batch_sizee"
    else:
        first = next(iter(PARAMS[section]))
        params, key = with_change(section, first + "e", PARAMS[section][first]), f"{section}.{first}e"
    with pytest.raises(SystemExit) as e:
        schema.validate(params)
    assert one_line(e).startswith(f"error: params.yaml: unknown key {key} (")


@pytest.mark.parametrize("section, key, value, message", [
    ("runs", "baseline.lr", "abc", "runs.baseline.lr = 'abc' (str): expected a number > 0"),
    ("world", "raw_size", 10.5, "world.raw_size = 10.5 (float): expected an integer >= 1"),
    ("teacher", "epochs", True, "teacher.epochs = True (bool): expected an integer >= 1"),
    ("evaluate", "batch_size", -1, "evaluate.batch_size = -1 (int): expected an integer >= 1"),
    ("train", "lora_targets", "q_proj", "train.lora_targets = 'q_proj' (str): expected a non-empty list of strings"),
    ("synth", "executor", "spark", "synth.executor = 'spark' (str): expected one of 'default', 'ray'"),
    ("seed", "", "0", "seed = '0' (str): expected an integer >= 0"),
])
def test_a_wrong_type_is_one_line_naming_the_key(section, key, value, message):
    with pytest.raises(SystemExit) as e:
        schema.validate(with_change(section, key, value))
    assert one_line(e) == f"error: params.yaml: {message}"


def test_numbers_pyyaml_reads_as_strings_are_numbers():
    """YAML 1.1 reads `1e-3` (no dot) as a string; `dvc exp run -S runs.baseline.lr=1e-3` means a number."""
    assert schema.validate(with_change("runs", "baseline.lr", "1e-3"))["runs"]["baseline"]["lr"] == 1e-3


def test_a_misspelt_key_stops_the_stage_before_any_work(tmp_path):
    """`dvc exp run -S +world.raw_sizee=100 prepare` exited 0, ignoring the key; now: exit 1, one line, nothing written."""
    small = {**PARAMS["world"], **yaml.safe_load((REPO / "tests/small_profile.yaml").read_text())["world"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("world", "raw_sizee", 100,
                                                                     with_change("world", "", small))))
    run = subprocess.run([PY, str(REPO / "stages/prepare.py"), "--out_raw", "raw", "--out_world", "world",
                          "--metrics", "m.json"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "error: params.yaml: unknown key world.raw_sizee (did you mean world.raw_size?)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_no_dataclass_default_disagrees_with_params_yaml():
    """Defaults live in params.yaml; a config class may keep one only where it says the same."""
    import dataclasses

    from vlmlab.evaluate.benchmarks import GenConfig
    from vlmlab.synth.recipe import SynthConfig
    from vlmlab.sim.teacher import TeacherConfig
    from vlmlab.train.recipe import StageConfig, TrainConfig
    from vlmlab.sim.world import WorldConfig

    mirrors = [(TeacherConfig, PARAMS["teacher"], ""), (SynthConfig, PARAMS["synth"], ""),
               (GenConfig, PARAMS["evaluate"], ""), (WorldConfig, PARAMS["world"], ""),
               (TrainConfig, PARAMS["train"], ""), (StageConfig, PARAMS["train"], "stage1_"),
               (StageConfig, PARAMS["train"], "stage2_")]
    disagree = []
    for cls, section, prefix in mirrors:
        for f in dataclasses.fields(cls):
            if prefix + f.name in section and f.default is not dataclasses.MISSING \
                    and f.default != section[prefix + f.name]:
                disagree.append(f"{cls.__name__}.{f.name} = {f.default!r} vs params.yaml {prefix}{f.name}: "
                                f"{section[prefix + f.name]!r}")
    assert not disagree, "\n".join(disagree)


# ---------------------------------------------------------------- 4. each stage's code deps are what it imports

def module_path(name: str) -> Path | None:
    """vlmlab.x.y -> vlmlab/x/y.py or vlmlab/x/y/__init__.py (this repository's modules only)."""
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def code_used_by(path: Path) -> set[Path]:
    """The repository files one module runs: what it imports (at any depth in the file, lazy imports
    included; a package's __init__ runs with it) and sibling .py files it reads as code (by name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for mod, imported in imports_in(tree, package):
        names |= {mod, *(f"{mod}.{n}" for n in imported)}  # `from vlmlab import io`: a module
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py") \
                and "/" not in node.value:  # a file next to it or one folder down (a Data-Juicer custom op)
            for code in [path.parent / node.value, *path.parent.glob(f"*/{node.value}")]:
                if code.is_file():
                    names.add(".".join(code.relative_to(REPO).with_suffix("").parts))
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            hit = module_path(".".join(parts[:i]))
            if hit is not None:
                found.add(hit)
    return found


def closure(script: Path) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += code_used_by(path)
    return {str(p.relative_to(REPO)) for p in seen}


def declared_code(deps: list[str]) -> set[str]:
    """dvc.yaml code deps (under stages/ or vlmlab/) as the .py files they cover."""
    files = set()
    for dep in deps:
        path = REPO / dep
        if not dep.startswith(("stages/", "vlmlab/")):
            continue
        if path.is_dir():
            files |= {str(p.relative_to(REPO)) for p in path.rglob("*.py") if "__pycache__" not in p.parts}
        else:
            files.add(dep)
    return files


def stage_scripts() -> dict[str, tuple[Path, list[str]]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = next(w for w in body["cmd"].split() if w.startswith("stages/") and w.endswith(".py"))
        out[name] = (REPO / script, body["deps"])
    return out


@pytest.mark.parametrize("stage", list(stage_scripts()))
def test_a_stages_code_deps_are_exactly_its_import_closure(stage):
    script, deps = stage_scripts()[stage]
    imported, declared = closure(script), declared_code(deps)
    missing, extra = sorted(imported - declared), sorted(declared - imported)
    assert not missing and not extra, (f"dvc.yaml stage {stage}: add to deps {missing}; remove from deps {extra} "
                                       "(a folder that holds files the stage does not import: list the files)")


def test_a_stage_runs_the_checkout_it_lives_in(tmp_path):
    """A clone (or a `dvc exp run --temp` copy) sharing a venv whose editable install maps vlmlab elsewhere."""
    clone = tmp_path / "clone"
    for name in ("stages", "vlmlab"):
        shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    with open(clone / "vlmlab" / "__init__.py", "a") as f:
        f.write("\nprint('vlmlab from', __file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for stage in ("analyze", "train"):
        run = subprocess.run([PY, f"stages/{stage}.py", "--help"], cwd=clone, env=env, capture_output=True, text=True)
        assert f"vlmlab from {clone / 'vlmlab' / '__init__.py'}" in run.stdout, (stage, run.stdout[-500:], run.stderr[-800:])
