"""Atomic writes, params and metrics: the few helpers every stage shares.

Nothing half-written may look finished: every file or folder is written under a
temporary name beside its target and renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml


class StageError(SystemExit):
    """A whole input is unusable: one clear line (what, where, how to fix) on stderr, exit code 1."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def fail(message: str) -> "StageError":
    return StageError(f"error: {message}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` only if the block succeeds.

    Works for a file or a folder. A previous `target` is replaced; on error the temp is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp_target = tmp / target.name
    try:
        yield tmp_target
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(tmp_target, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Strict reader for files this project wrote itself (importers of outside data validate per line)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise fail(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def write_metrics(path: str | os.PathLike, metrics: dict) -> dict:
    """Flat JSON of numbers (DVC drops lists); non-finite floats are refused, not hidden."""
    flat = flatten(metrics)
    for key, value in flat.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metric {key!r} is {type(value).__name__}, not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {key!r} is {value}")
    write_json(path, metrics)
    return flat


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    p = Path(path)
    if not p.exists():
        raise fail(f"{p}: no such params file (run from the repository root)")
    return yaml.safe_load(p.read_text(encoding="utf-8"))
