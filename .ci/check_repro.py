"""After a clean `dvc repro`: every stage must have rebuilt what the committed dvc.lock records.

    python .ci/check_repro.py [--ref HEAD]

Two kinds of outputs, two checks:
- data and models (cached outs: data/, models/, configs/recipes/) must hash exactly as committed;
- metrics files (cache: false) hold measurements of the run itself too (wall time, throughput, memory,
  CPU), which no two runs share; every other number in them must equal the committed one exactly.
Plots and reports are views of those two and are not checked. Exit 1 with one line per difference.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

# keys that measure the run, not its result (seconds, rates, memory, CPU share)
MEASURED = re.compile(r"(^|_)(wall|seconds|s|qps|per_s|mb|gb|rss|cpu|cpu_pct|util|memory)($|_)|_s$|per_s")
VIEWS = ("metrics/", "plots/", "reports/")


def committed(ref: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{ref}:{path}"], check=True, capture_output=True, text=True).stdout


def outs(lock: dict) -> dict[str, str]:
    return {o["path"]: o.get("md5", "") for stage in lock["stages"].values() for o in stage.get("outs", [])}


def flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], obj


def main(ref: str = "HEAD") -> int:
    before, after = outs(yaml.safe_load(committed(ref, "dvc.lock"))), outs(yaml.safe_load(Path("dvc.lock").read_text()))
    problems = [f"{p}: stage output missing after repro" for p in before if p not in after]
    for path, md5 in before.items():
        if path in after and not path.startswith(VIEWS) and after[path] != md5:
            problems.append(f"{path}: md5 {after[path]} != committed {md5}")
    metrics = sorted(p for p in before if p.startswith("metrics/") and p.endswith(".json"))
    for path in metrics:
        old = dict(flat(json.loads(committed(ref, path))))
        new = dict(flat(json.loads(Path(path).read_text()))) if Path(path).exists() else {}
        for key in sorted(set(old) | set(new)):
            if MEASURED.search(key.rsplit(".", 1)[-1]) or (key.split(".")[0] == "monitor"):
                continue
            if old.get(key, "<absent>") != new.get(key, "<absent>"):
                problems.append(f"{path}: {key} = {new.get(key, '<absent>')!r}, committed {old.get(key, '<absent>')!r}")
    for line in problems:
        print(line)
    print(f"check_repro: {len(before)} outputs, {len(metrics)} metrics files compared with {ref}: "
          + (f"{len(problems)} differences" if problems else "all equal (measurements of time and memory aside)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
