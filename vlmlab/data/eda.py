"""Exploratory analysis of a caption set in the data layout (dj.jsonl + rejects.jsonl + images).

`analyze(folder)` reads the set once and returns flat-ish numeric metrics plus small tables
(histograms, top words) that the `analyze` stage writes as DVC plot CSVs and a PNG.
Words are whitespace tokens (lower-cased), as Data-Juicer's words_num_filter counts them,
so a Chinese caption without spaces counts as one word: that is what a filter will see.
"""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vlmlab.data.formats import FormatError, caption_of
from vlmlab.io import fail, read_jsonl


# each table's CSV columns, in order: an empty table (every image missing, no caption parsed)
# is still written, as its header alone
COLUMNS = {
    "caption_words": ("words", "samples"),
    "caption_chars": ("chars", "samples"),
    "top_words": ("word", "count"),
    "rejects": ("reason", "count"),
    "image_sizes": ("size", "count"),
}


@dataclass
class Analysis:
    metrics: dict                                      # nested dict of numbers (DVC flattens it)
    tables: dict[str, list[dict]] = field(default_factory=dict)   # name -> rows for a CSV (COLUMNS[name])


def _summary(values: list[int]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": round(float(a.mean()), 4), "median": float(np.median(a)), "p05": float(np.percentile(a, 5)),
            "p95": float(np.percentile(a, 95)), "min": int(a.min()), "max": int(a.max())}


def _histogram(values: list[int], bin_width: int, key: str) -> list[dict]:
    counts = Counter(v // bin_width * bin_width for v in values)
    return [{key: b, "samples": counts.get(b, 0)} for b in range(0, max(counts) + 1, bin_width)]


def analyze(folder: str | Path, top_words: int = 30, char_bin: int = 10) -> Analysis:
    folder = Path(folder)
    if not (folder / "dj.jsonl").is_file():
        raise fail(f"{folder}/dj.jsonl: no such file; run `dvc repro prepare` (or the stage that writes {folder}) first")
    rows = read_jsonl(folder / "dj.jsonl")
    if not rows:
        raise fail(f"{folder}/dj.jsonl is empty: nothing to analyse")
    rejects = read_jsonl(folder / "rejects.jsonl") if (folder / "rejects.jsonl").is_file() else []

    captions, unparsable = [], 0
    for r in rows:
        try:
            captions.append(caption_of(r["text"]))
        except FormatError:
            unparsable += 1   # a set that passed prepare has none; count rather than hide
            captions.append("")
    words = [c.lower().split() for c in captions]
    n_words = [len(w) for w in words]
    n_chars = [len(c) for c in captions]
    vocab = Counter(t for w in words for t in w)
    dup_caps = len(captions) - len(set(captions))   # exact repeats beyond each caption's first

    # each distinct image path once: its size and content hash (exact duplicates under other names)
    paths = sorted({r["images"][0] for r in rows})
    digests, sizes, missing = {}, Counter(), 0
    for p in paths:
        f = folder / p
        if not f.is_file():
            missing += 1
            continue
        data = f.read_bytes()
        digests[p] = hashlib.md5(data).hexdigest()
        with Image.open(io.BytesIO(data)) as im:   # the bytes just hashed: one read per image
            sizes[im.size] += 1
    widths = [w for (w, _), k in sizes.items() for _ in range(k)]
    heights = [h for (_, h), k in sizes.items() for _ in range(k)]
    reasons = Counter(r.get("reason", "unknown") for r in rejects)

    metrics = {
        "samples": len(rows),
        "rejects": {**dict(sorted(reasons.items())), "total": len(rejects)},
        "caption_words": _summary(n_words),
        "caption_chars": _summary(n_chars),
        "vocab_size": len(vocab),
        "unparsable_texts": unparsable,
        "duplicate_captions": dup_caps,
        "duplicate_caption_share": round(dup_caps / len(rows), 4),
        "images": {"distinct_paths": len(paths), "missing": missing,
                   "duplicate_content": len(digests) - len(set(digests.values())),
                   "distinct_sizes": len(sizes)},
    }
    if sizes:
        metrics["images"].update(width=_summary(widths), height=_summary(heights))
    tables = {
        "caption_words": _histogram(n_words, 1, "words"),
        "caption_chars": _histogram(n_chars, char_bin, "chars"),
        "top_words": [{"word": w, "count": c} for w, c in sorted(vocab.items(), key=lambda x: (-x[1], x[0]))[:top_words]],
        "rejects": [{"reason": k, "count": v} for k, v in sorted(reasons.items())] or [{"reason": "none", "count": 0}],
        "image_sizes": [{"size": f"{w}x{h}", "count": c} for (w, h), c in sorted(sizes.items(), key=lambda x: (-x[1], x[0]))[:20]],
    }
    return Analysis(metrics, tables)


def plot_overview(analysis: Analysis, title: str, path: str | Path) -> None:
    """One PNG with the four distributions; deterministic bytes (no software/date metadata)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = analysis.tables
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax[0, 0].bar([r["words"] for r in t["caption_words"]], [r["samples"] for r in t["caption_words"]])
    ax[0, 0].set(title="caption length (words)", xlabel="words", ylabel="samples")
    ax[0, 1].bar([r["chars"] for r in t["caption_chars"]], [r["samples"] for r in t["caption_chars"]],
                 width=(t["caption_chars"][1]["chars"] if len(t["caption_chars"]) > 1 else 1) * 0.9, align="edge")
    ax[0, 1].set(title="caption length (characters)", xlabel="characters", ylabel="samples")
    top = t["top_words"][:20][::-1]
    ax[1, 0].barh([r["word"] for r in top], [r["count"] for r in top])
    ax[1, 0].set(title="top words", xlabel="count")
    sizes = t["image_sizes"][:10][::-1]
    ax[1, 1].barh([r["size"] for r in sizes], [r["count"] for r in sizes])
    ax[1, 1].set(title="image sizes (distinct files)", xlabel="images")
    m = analysis.metrics
    fig.suptitle(f"{title}: {m['samples']} samples, {m['rejects']['total']} rejects, vocabulary {m['vocab_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
