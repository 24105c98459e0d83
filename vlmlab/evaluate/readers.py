"""Readers for benchmark and prediction files, strict where it matters.

Formats (docs/contracts.md): LLaVA TextVQA question jsonl, TextVQA_0.5.1_val.json
annotations, LLaVA-style prediction jsonl, caption references jsonl (LLaVA caps_boxes
layout) and the mmbench_dev tsv (base64 images). A file that cannot be used stops with one
line saying what, where and how to fix (`vlmlab.io.fail`, a SystemExit).
"""
from __future__ import annotations

import base64
import csv
import io as _io
import json
import sys
from pathlib import Path

from PIL import Image

from vlmlab.io import fail

OPTION_LETTERS = "ABCDEFGHI"


def read_records(path: str | Path, what: str, required: tuple[str, ...], fix: str) -> list[dict]:
    """A jsonl of objects, each with `required` keys; empty, unparsable or incomplete -> fail."""
    path = Path(path)
    if not path.is_file():
        raise fail(f"{path}: no such {what} file ({fix})")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise fail(f"{path}:{lineno}: {what} line is not valid JSON ({e.msg}); {fix}") from None
            if not isinstance(row, dict):
                raise fail(f"{path}:{lineno}: {what} line is a {type(row).__name__}, not an object; {fix}")
            missing = [k for k in required if k not in row]
            if missing:
                raise fail(f"{path}:{lineno}: {what} line lacks {', '.join(missing)}; {fix}")
            rows.append(row)
    if not rows:
        raise fail(f"{path}: {what} file is empty; {fix}")
    return rows


def read_textvqa_questions(path: str | Path) -> list[dict]:
    """LLaVA question jsonl: {"question_id" (image id), "image", "text" (prompt), ...}."""
    return read_records(path, "TextVQA question", ("question_id", "image", "text"),
                        "expected LLaVA's llava_textvqa_val_v051_ocr.jsonl layout")


def read_textvqa_annotations(path: str | Path) -> list[dict]:
    """TextVQA_0.5.1_val.json: {"data": [{"image_id", "question", "answers": [10 str]}]}."""
    path = Path(path)
    fix = 'expected TextVQA_0.5.1_val.json layout {"data": [{"image_id", "question", "answers"}]}'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except FileNotFoundError:
        raise fail(f"{path}: no such TextVQA annotation file ({fix})") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise fail(f"{path}: not a TextVQA annotation file ({type(e).__name__}: {e}); {fix}") from None
    if not data:
        raise fail(f"{path}: TextVQA annotation file has no questions; {fix}")
    for n, a in enumerate(data):
        if not {"image_id", "question", "answers"} <= a.keys() or not a["answers"]:
            raise fail(f"{path}: data[{n}] lacks image_id, question or answers; {fix}")
    return data


def read_predictions(path: str | Path) -> list[dict]:
    """Prediction jsonl as LLaVA writes it: {"question_id", "prompt", "text", ...} one a line."""
    return read_records(path, "prediction", ("question_id", "text"),
                        "expected one {\"question_id\", \"prompt\", \"text\"} object a line, as `evaluate` writes")


def read_caption_refs(path: str | Path) -> list[dict]:
    """Caption references jsonl: {"id", "image", "captions": [str, ...]} (LLaVA caps_boxes layout)."""
    rows = read_records(path, "caption reference", ("id", "image", "captions"),
                        "expected LLaVA caps_boxes layout {\"id\", \"image\", \"captions\": [...]}")
    for n, r in enumerate(rows, 1):
        if not r["captions"] or not all(isinstance(c, str) for c in r["captions"]):
            raise fail(f"{path}: row {n} (id {r['id']!r}) has no reference captions; give each image >= 1 caption")
    return rows


def read_mmbench_tsv(path: str | Path) -> list[dict]:
    """mmbench_dev tsv -> [{"index": int, "question", "hint", "options": {letter: text}, "answer", "category", "image"}].

    Options are the non-empty letter columns in order; "image" stays base64 (see `decode_image`).
    """
    path = Path(path)
    fix = "expected mmbench_dev tsv columns index, question, hint, A, B, C, D, answer, category, image"
    if not path.is_file():
        raise fail(f"{path}: no such MMBench tsv ({fix})")
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's 128 KiB default
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        missing = [c for c in ("index", "question", "A", "B", "answer", "image") if c not in header]
        if missing:
            raise fail(f"{path}: MMBench tsv lacks column(s) {', '.join(missing)}; {fix}")
        rows = []
        for lineno, r in enumerate(reader, 2):
            try:
                index = int(float(r["index"]))
            except (TypeError, ValueError):
                raise fail(f"{path}:{lineno}: index {r['index']!r} is not a number; {fix}") from None
            options = {c: r[c] for c in OPTION_LETTERS if c in r and r[c] not in (None, "", "nan")}
            rows.append({"index": index, "question": r["question"], "hint": _clean(r.get("hint")),
                         "options": options, "answer": (r.get("answer") or "").strip(),
                         "category": _clean(r.get("category")) or "all", "image": r["image"]})
    if not rows:
        raise fail(f"{path}: MMBench tsv has no rows; {fix}")
    return rows


def _clean(value: str | None) -> str:
    return "" if value is None or value.strip() in ("", "nan") else value


def decode_image(b64: str) -> Image.Image:
    """A base64 image cell of the MMBench tsv as an RGB PIL image."""
    return Image.open(_io.BytesIO(base64.b64decode(b64))).convert("RGB")
