"""MMBench scoring without an API judge: rule-based choice extraction, single-pass and
CircularEval accuracy, per category.

CircularEval (MMBench, Liu et al. 2023): a question is asked once per rotation of its
options and counts as right only if every rotation is answered right. Rows of one question
share `index % 1_000_000`; rotation k has index + k * 1_000_000 (the legacy mmbench_dev
tsv and LLaVA's answer files). The group size is the number of rows sharing an index, not
the number of options: legacy 3-rotation items may carry a fixed 4th option.
"""
from __future__ import annotations

import re
from collections import defaultdict

GROUP = 1_000_000
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
_LEAD = re.compile(r"^\s*(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)?\s*(?:is)?\s*[:：]?\s*", re.IGNORECASE)
_PUNCT = re.compile(r"[^\w\s]")


def build_prompt(question: str, options: dict[str, str], hint: str = "") -> str:
    """LLaVA's MMBench prompt: [hint\\n]question, one "A. text" line per option, then the instruction."""
    lines = ([hint] if hint else []) + [question] + [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines) + "\n" + PROMPT_SUFFIX


def _norm(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a free-form answer picks, or None when it names none or several.

    Rules, first that decides wins:
    1. the answer starts with a marked letter ("B", "(B)", "B.", "B) text", "Answer: B", "b");
    2. exactly one option letter appears as a standalone upper-case word (a sentence-initial
       "A" in a longer answer is taken as the article, not a choice);
    3. the answer contains the text of exactly one option (case and punctuation ignored),
       preferring an exact match.
    """
    letters = list(options)
    text = prediction.strip()
    if not text:
        return None
    head = _LEAD.sub("", text, count=1)
    # "(B)", "B.", "B)", "B:", "B"; lower case too (a lower-casing tokenizer can only say "b")
    m = re.match(r"^(?:\(([A-Za-z])\)|([A-Za-z])(?:[.:)]|$))", head)
    m = m and (m.group(1) or m.group(2)).upper()
    if m in letters:
        return m
    words = _PUNCT.sub(" ", text).split()
    found = {w for w in words if w in letters}
    if len(found) == 1:
        (letter,) = found
        if not (letter == "A" and words and words[0] == "A" and len(words) > 3):
            return letter
    pred = _norm(text)
    exact = [k for k, v in options.items() if _norm(v) == pred]
    if len(exact) == 1:
        return exact[0]
    contained = [k for k, v in options.items() if _norm(v) and _norm(v) in pred]
    return contained[0] if len(contained) == 1 else None


def rotate_options(options: list[str], k: int, n: int) -> list[str]:
    """Rotation k of a question's options, legacy-tsv direction: option j moves to (j + k) % n.

    Only the first n options rotate (n = group size); any after them stay in place.
    """
    out = list(options)
    for j in range(n):
        out[(j + k) % n] = options[j]
    return out


def expand_rotations(rows: list[dict]) -> list[dict]:
    """Rows of base questions only (index < 1e6, as new-style tsvs ship) -> every rotation.

    Row keys: "index", "options" {letter: text}, "answer" letter; the rest is copied. A
    question with n options gets n rows; the answer letter follows its option.
    """
    out = []
    for row in rows:
        letters, texts = list(row["options"]), list(row["options"].values())
        n = len(texts)
        for k in range(n):
            rotated = rotate_options(texts, k, n)
            answer = letters[rotated.index(row["options"][row["answer"]])] if row.get("answer") else ""
            out.append({**row, "index": row["index"] + k * GROUP,
                        "options": dict(zip(letters, rotated)), "answer": answer})
    return out


def group_outcomes(rows: list[dict]) -> list[dict]:
    """One entry per question (the rows sharing `index % 1e6`), in order of first appearance.

    Rows: {"index", "category", "answer", "pred"}. Entry: {"group", "category", "first" (the
    rotation-0 row answered right), "circular" (every rotation answered right)}. These are
    MMBench's resampling units: a bootstrap draws whole questions, all rotations together.
    """
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["index"] % GROUP].append(r)
    out = []
    for key, members in groups.items():
        base = min(members, key=lambda r: r["index"])
        out.append({"group": key, "category": base.get("category") or "all",
                    "first": base["pred"] == base["answer"],
                    "circular": all(r["pred"] == r["answer"] for r in members)})
    return out


def score(rows: list[dict]) -> dict:
    """Accuracy of scored rows {"index", "category", "answer", "pred"} (letters; pred may be None).

    Returns flat numbers: "acc" (single pass: the rotation-0 rows), "circular_acc" (a
    question is right only if all its rotations are), "row_acc" (every row), "questions",
    and "by_category": {category: {"acc", "circular_acc", "questions"}}.
    """
    if not rows:
        raise ValueError("mmbench.score: no rows to score")
    per_cat: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for g in group_outcomes(rows):
        per_cat[g["category"]].append((g["first"], g["circular"]))
    flat_all = [x for v in per_cat.values() for x in v]
    result = {
        "acc": sum(f for f, _ in flat_all) / len(flat_all),
        "circular_acc": sum(c for _, c in flat_all) / len(flat_all),
        "row_acc": sum(r["pred"] == r["answer"] for r in rows) / len(rows),
        "questions": len(flat_all),
    }
    result["by_category"] = {
        cat: {"acc": sum(f for f, _ in v) / len(v), "circular_acc": sum(c for _, c in v) / len(v), "questions": len(v)}
        for cat, v in sorted(per_cat.items())
    }
    return result
