"""Atomic writes, params and metrics: the few helpers every stage shares.

Nothing half-written may look finished: every file or folder is written under a
temporary name beside its target and renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import errno
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


# write errors that are the user's to fix (a full disk, a read-only place): one line, not a traceback
USER_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def cannot_write(target: Path, e: Exception) -> "StageError":
    why = e.strerror if isinstance(e, OSError) and e.strerror else "No space left on device"
    return fail(f"{target}: cannot write it ({why}); free space or pick a writable place, "
                "then re-run (nothing was replaced)")


def is_user_write_error(e: BaseException, where: str | os.PathLike) -> bool:
    """A full disk or a read-only place, however the writer reports it: an OSError, safetensors'
    SafetensorError ("No space left on device (os error 28)"), or torch.save's RuntimeError that
    names nothing (then: `where` has no free space left at the moment of the failure)."""
    if isinstance(e, OSError) and e.errno in USER_WRITE_ERRORS:
        return True
    if not isinstance(e, Exception) or isinstance(e, StageError):
        return False
    if "No space left on device" in str(e):
        return True
    try:
        return shutil.disk_usage(where).free < 2**20
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` only if the block succeeds.

    Works for a file or a folder. A previous `target` of the same kind is replaced (a folder is
    replaced only by a folder: a file path that names an existing folder is an error, never a
    deletion); on error the temp is removed and `target` is left as it was.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise cannot_write(target, e) from None
    tmp_target = tmp / target.name
    try:
        try:
            yield tmp_target
        except Exception as e:
            if is_user_write_error(e, tmp):
                raise cannot_write(target, e) from None
            raise
        if target.is_dir() and not target.is_symlink():
            if not tmp_target.is_dir():
                raise fail(f"{target} is a folder: not replacing it with a file (give a file path)")
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(tmp_target, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Fail early (before any heavy work) if `path` cannot become a file: an existing folder, or a
    place this process cannot write (checked by writing, so a read-only mount is caught as root too)."""
    path = Path(path)
    if path.is_dir():
        raise fail(f"{what} {path} is a folder: give a file path (e.g. {path / 'answers.jsonl'}); nothing was written")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))  # what atomic_path will do
    except OSError as e:
        raise cannot_write(path, e) from None
    return path


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


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`dst` as a hard link to `src` (same filesystem: no second copy of 10k images), else a copy."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):   # re-validating a folder in place
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
