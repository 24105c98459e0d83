"""The whole DVC graph, for real, on a small profile of the tiny world.

A copy of the working tree becomes its own git+DVC repository; params.yaml gets the
overrides in tests/small_profile.yaml; then `dvc repro` must build every stage, a second
`dvc repro` must do nothing, and `dvc exp run -S` must run an experiment that `dvc exp show` lists.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KEEP = ["dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config", ".dvcignore", "stages", "vlmlab", "configs"]

pytestmark = pytest.mark.slow


def merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    root.mkdir()
    for name in KEEP:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    merge(params, yaml.safe_load((REPO / "tests" / "small_profile.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/data/\n/models/\n/work/\n/dvclive/\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(root), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "VLMLAB_NO_VML": "1"}  # every stage raises at an op whose bits follow the CPU vendor (vlmlab/determinism.py)
    sh(["git", "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "small profile"], root, env)
    sh(["dvc", "repro"], root, env)
    return root, env


def test_repro_builds_every_stage(small_repo):
    root, env = small_repo
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    expected = set()
    for name, stage in stages.items():
        items = stage.get("foreach")
        if items is None:
            expected.add(name)
            continue
        if isinstance(items, str):  # ${section.key} from params
            node = yaml.safe_load((root / "params.yaml").read_text())
            for part in items.strip("${}").split("."):
                node = node[part]
            items = node
        expected |= {f"{name}@{k}" for k in items}
    assert expected <= set(lock["stages"]), f"not run: {sorted(expected - set(lock['stages']))}"
    for model in yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["models"]:
        metrics = json.loads((root / "metrics" / "eval" / f"{model}.json").read_text())
        assert 0.0 <= metrics["textvqa_acc"] <= 1.0 and "cider" in metrics
        for k in ("textvqa_acc", "cider", "bleu_4", "mmbench_acc", "mmbench_circular_acc"):
            assert metrics[f"{k}_ci_low"] <= metrics[k] <= metrics[f"{k}_ci_high"], (model, k)
            lo, diff, hi = (metrics[f"{k}_minus_blind{s}"] for s in ("_ci_low", "", "_ci_high"))
            assert lo <= diff <= hi and diff == pytest.approx(metrics[k] - metrics[f"{k}_blind"]), (model, k)
    compared = json.loads((root / "metrics" / "compare.json").read_text())
    assert {"data", "strategy", "interaction"} <= set(compared["effects"])  # the 2x2 design was filled
    report = (root / "reports" / "compare.md").read_text()
    assert "## Factor effects" in report and "## Blind control" in report


def test_second_repro_does_nothing(small_repo):
    root, env = small_repo
    out = sh(["dvc", "repro"], root, env)
    assert "Running stage" not in out, out
    assert "up to date" in out.lower()


def test_exp_run_with_a_param_and_exp_show(small_repo):
    root, env = small_repo
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "lock"], root, env)
    sh(["dvc", "exp", "run", "-n", "by-bleu", "-S", "compare.metric=bleu_4"], root, env)  # re-runs compare only
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], root, env))
    assert "by-bleu" in json.dumps(shown)
