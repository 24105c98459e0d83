"""One model on the three benchmarks: read the files, ask in each benchmark's prompt format,
generate in batches, score, and return per-sample rows (the predictions file) and metrics.

Each `run_*` returns (rows, metrics). Rows keep what a reviewer needs to audit a score:
the prompt as asked, the raw answer, and the per-sample score.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from vlmlab.evaluate import captions, mmbench, readers, textvqa
from vlmlab.evaluate.generate import generate_answers
from vlmlab.io import fail


@dataclass
class GenConfig:
    batch_size: int                 # prompts per generation batch (sorted by length, left padded); evaluate.batch_size
    textvqa_max_new_tokens: int = 8  # a word or a phrase
    caption_max_new_tokens: int = 48  # a dense world caption is ~40 word-level tokens
    mmbench_max_new_tokens: int = 4  # a letter (a chatty answer still gets its first words read)
    caption_prompt: str = "Describe the image concisely."  # one of MGM's stage-1 caption prompts
    limit: int = 0                  # score only the first N items of each set (0: all); for smoke runs
    prefix_batch: int = 0           # images per tower call / prefix prefill (0: batch_size)
    compile: bool = False           # GPU: static cache, compiled prefill, CUDA-graph decode steps


def _images(root: str | Path, names: list[str], what: str) -> list[Path]:
    root = Path(root)
    paths = [root / n for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise fail(f"{len(missing)} of {len(paths)} {what} images missing under {root}, e.g. {missing[0]}; "
                   f"point the image root param at the folder the file's image paths are relative to")
    return paths


def _limit(rows: list, n: int) -> list:
    return rows[:n] if n else rows


def _generate(model, processor, items, max_new_tokens: int, cfg: GenConfig) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    answers = generate_answers(model, processor, items, batch_size=cfg.batch_size, max_new_tokens=max_new_tokens,
                               cache="static" if cfg.compile else "dynamic", compile=cfg.compile,
                               prefix_batch=cfg.prefix_batch or None)
    return answers, time.perf_counter() - t0


def run_textvqa(model, processor, questions: str, annotations: str, image_root: str, cfg: GenConfig):
    """LLaVA question file + TextVQA annotations -> soft accuracy (EvalAI), per question type if given."""
    qs = _limit(readers.read_textvqa_questions(questions), cfg.limit)
    ann = readers.read_textvqa_annotations(annotations)
    paths = _images(image_root, [q["image"] for q in qs], "TextVQA")
    items = [{"prompt": q["text"], "image": p} for q, p in zip(qs, paths)]
    answers, seconds = _generate(model, processor, items, cfg.textvqa_max_new_tokens, cfg)
    preds = [{"question_id": q["question_id"], "prompt": q["text"], "text": a} for q, a in zip(qs, answers)]
    try:
        matched = textvqa.match_annotations(preds, ann)
    except KeyError as e:
        raise fail(f"{questions} vs {annotations}: {e.args[0]}; the two files must describe the same questions") from None
    scores = [textvqa.soft_score(p["text"], a["answers"]) for p, a in zip(preds, matched)]
    rows, by_type = [], {}
    for p, a, s in zip(preds, matched, scores):
        rows.append({**p, "answers": a["answers"], "score": s})
        if "question_type" in a:
            by_type.setdefault(a["question_type"], []).append(s)
    metrics = {"textvqa_acc": sum(scores) / len(scores), "textvqa_questions": len(scores),
               "textvqa_qps": len(scores) / seconds}
    if by_type:
        metrics["textvqa_by_type"] = {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
    return rows, metrics


def run_captions(model, processor, refs_path: str, image_root: str, cfg: GenConfig):
    """Caption references jsonl -> BLEU-1..4 and CIDEr-D of one generated caption per image."""
    refs = _limit(readers.read_caption_refs(refs_path), cfg.limit)
    if len({str(r["id"]) for r in refs}) != len(refs):
        raise fail(f"{refs_path}: image ids repeat; give each reference row a unique id")
    paths = _images(image_root, [r["image"] for r in refs], "caption")
    items = [{"prompt": cfg.caption_prompt, "image": p} for p in paths]
    answers, seconds = _generate(model, processor, items, cfg.caption_max_new_tokens, cfg)
    preds = {str(r["id"]): a for r, a in zip(refs, answers)}
    scores = captions.caption_scores(preds, {str(r["id"]): r["captions"] for r in refs})
    rows = [{"id": r["id"], "image": r["image"], "prompt": cfg.caption_prompt, "text": a, "references": r["captions"]}
            for r, a in zip(refs, answers)]
    return rows, {**scores, "caption_images": len(rows), "caption_qps": len(rows) / seconds}


def run_mmbench(model, processor, tsv: str, cfg: GenConfig):
    """mmbench tsv -> single-pass and CircularEval accuracy, per category.

    A tsv of base questions only (index < 1e6 each once, as new-style files and the tiny
    world ship) is expanded into every rotation; a legacy tsv already holds them.
    """
    rows = readers.read_mmbench_tsv(tsv)
    if cfg.limit:
        keep = set(sorted({r["index"] % mmbench.GROUP for r in rows})[:cfg.limit])
        rows = [r for r in rows if r["index"] % mmbench.GROUP in keep]
    if all(r["index"] < mmbench.GROUP for r in rows):
        rows = mmbench.expand_rotations(rows)
    for r in rows:
        if r["answer"] not in r["options"]:
            raise fail(f"{tsv}: index {r['index']} answer {r['answer']!r} is not one of its options "
                       f"{''.join(r['options'])}; the dev tsv (with answers) is needed for scoring")
    images = {}
    for r in rows:  # rotations share their image: decode it once
        key = r["index"] % mmbench.GROUP
        if key not in images:
            images[key] = readers.decode_image(r["image"])
    prompts = [mmbench.build_prompt(r["question"], r["options"], r["hint"]) for r in rows]
    items = [{"prompt": p, "image": images[r["index"] % mmbench.GROUP]} for p, r in zip(prompts, rows)]
    answers, seconds = _generate(model, processor, items, cfg.mmbench_max_new_tokens, cfg)
    out = []
    for r, p, a in zip(rows, prompts, answers):
        pred = mmbench.extract_choice(a, r["options"])
        out.append({"index": r["index"], "category": r["category"], "prompt": p, "text": a,
                    "pred": pred, "answer": r["answer"]})
    s = mmbench.score(out)
    metrics = {"mmbench_acc": s["acc"], "mmbench_circular_acc": s["circular_acc"], "mmbench_row_acc": s["row_acc"],
               "mmbench_questions": s["questions"], "mmbench_rows": len(out),
               "mmbench_unparsed": sum(o["pred"] is None for o in out), "mmbench_qps": len(out) / seconds,
               "mmbench_by_category": s["by_category"]}
    return out, metrics
