"""Build the tiny world's data sets (the seed set and the world-only sets) bit-for-bit reproducibly.

Every item's randomness comes from its own Generator seeded with (seed, split, index), so the
output does not depend on worker scheduling, and held-out eval splits are separate streams:
no eval scene is drawn from a training split's stream. JPEG bytes are fixed by the encoder
settings below and the pinned Pillow.

The seed set is written as the MGM challenge ships it (`input/pretrain_stage_1_10k/`: the Data-Juicer
jsonl, its images, `stage_1.json` with the human prompts by id), never as `data/raw`: the `prepare`
stage imports it with the same importer as a real folder (`data.validate.import_seed`).
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path


from vlmlab.data.formats import dj_text, write_llava
from vlmlab.io import write_jsonl
from vlmlab.sim import text
from vlmlab.sim.scene import render, sample_scene
from vlmlab.sim.streams import CORPUS_STREAM, item_id, item_index, item_rng, split_rng

# the challenge's file names inside input/pretrain_stage_1_10k/ (params data.jsonl / data.stage1_json
# name them for a real folder)
SEED_JSONL = "mgm_pretrain_stage_1_10k.jsonl"
SEED_PROMPTS = "stage_1.json"

@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    raw_size: int = 4000       # seed set (params.yaml world.raw_size)
    curated_size: int = 2000   # dense captions
    instruct_size: int = 2000  # stage-2 conversations
    eval_textvqa: int = 300
    eval_caption: int = 200
    eval_mmbench: int = 150
    image_size: int = 96       # stored side (the high-res view)
    noise_rate: float = 0.35   # share of noisy raw captions
    jpeg_quality: int = 90
    workers: int = 2           # processes; results do not depend on it

    @classmethod
    def from_params(cls, params: dict) -> "WorldConfig":
        known = set(cls.__dataclass_fields__)
        return cls(seed=params["seed"], **{k: v for k, v in params["world"].items() if k in known})


def image_path(sample_id: str) -> str:
    return f"images/{sample_id[:5]}/{sample_id}.jpg"


def _make_item(job: tuple) -> tuple[str, bytes, dict]:
    """One scene of one split: (id, JPEG bytes, the texts that split needs)."""
    split, index, cfg = job
    rng = split_rng(cfg.seed, split, index)
    scene = sample_scene(rng)
    buf = io.BytesIO()
    # fixed encoder settings: no optimize pass, 4:2:0, no EXIF/ICC/timestamps
    render(scene, cfg.image_size).save(buf, format="JPEG", quality=cfg.jpeg_quality, subsampling=2, optimize=False)
    if split == "raw":
        texts = {"caption": text.web_caption(scene, rng, cfg.noise_rate),
                 "prompt": text.CAPTION_PROMPTS[int(rng.integers(len(text.CAPTION_PROMPTS)))]}
    elif split == "curated":
        texts = {"caption": text.dense_caption(scene, rng),
                 "prompt": text.CAPTION_PROMPTS[int(rng.integers(len(text.CAPTION_PROMPTS)))]}
    elif split == "instruct":
        texts = {"conversations": text.instruct_conversation(scene, rng)}
    elif split == "eval_textvqa":
        texts = text.textvqa_item(scene, rng)
    elif split == "eval_caption":
        texts = {"captions": [text.dense_caption(scene, rng) for _ in range(5)]}
    else:
        texts = text.mmbench_item(scene, rng)
    return item_id(split, index), buf.getvalue(), texts


def _items(split: str, n: int, cfg: WorldConfig, pool):
    jobs = [(split, i, cfg) for i in range(n)]
    return pool.imap(_make_item, jobs, chunksize=64) if pool else map(_make_item, jobs)


def _save_image(root: Path, sample_id: str, data: bytes) -> str:
    rel = image_path(sample_id)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
    return rel


def _caption_set(out: Path, split: str, cfg: WorldConfig, n: int, pool, dj_name: str = "dj.jsonl",
                 llava_name: str = "llava.json") -> int:
    """A DJ jsonl + LLaVA json caption set (raw alt-text or curated dense captions)."""
    out.mkdir(parents=True, exist_ok=True)   # a set of size 0 is still a (empty) set
    rows, records = [], []
    for sid, data, t in _items(split, n, cfg, pool):
        rel = _save_image(out, sid, data)
        rows.append({"id": sid, "text": dj_text(t["caption"]), "images": [rel]})
        records.append({"id": sid, "conversations": [{"from": "human", "value": f"<image>\n{t['prompt']}"},
                                                     {"from": "gpt", "value": t["caption"]}], "image": rel})
    write_jsonl(out / dj_name, rows)
    write_llava(out / llava_name, records)
    return len(rows)


def build_world(out_seed: str | Path | None, out_world: str | Path, params: dict) -> dict[str, int]:
    """Write the raw seed set to `out_seed` in the challenge's layout (SEED_JSONL, SEED_PROMPTS,
    images/; skipped if None: a real seed folder is imported instead) and the world-only sets
    (curated, instruct, eval) to `out_world`. Returns sample counts."""
    cfg = WorldConfig.from_params(params)
    out_world = Path(out_world)
    counts = {}
    ctx = mp.get_context("fork")
    with (ctx.Pool(cfg.workers) if cfg.workers > 1 else contextlib.nullcontext()) as pool:   # None: in-process
        if out_seed is not None:
            counts["raw"] = _caption_set(Path(out_seed), "raw", cfg, cfg.raw_size, pool, SEED_JSONL, SEED_PROMPTS)
        counts["curated"] = _caption_set(out_world / "curated", "curated", cfg, cfg.curated_size, pool)

        inst, ev = out_world / "instruct", out_world / "eval"
        inst.mkdir(parents=True, exist_ok=True)
        ev.mkdir(parents=True, exist_ok=True)
        records = []
        for sid, data, t in _items("instruct", cfg.instruct_size, cfg, pool):
            records.append({"id": sid, "image": _save_image(inst, sid, data), "conversations": t["conversations"]})
        write_llava(inst / "llava.json", records)
        counts["instruct"] = len(records)

        questions, annotations = [], []
        for qid, (sid, data, t) in enumerate(_items("eval_textvqa", cfg.eval_textvqa, cfg, pool)):
            rel = _save_image(ev, sid, data)
            questions.append({"question_id": sid, "image": rel, "text": f"{t['question']}\n{text.SHORT_ANSWER}",
                              "category": "default"})
            annotations.append({"question_id": qid, "image_id": sid, "question": t["question"],
                                "answers": t["answers"], "question_type": t["kind"]})
        write_jsonl(ev / "textvqa_questions.jsonl", questions)
        (ev / "textvqa_annotations.json").write_text(json.dumps({"dataset_name": "world_textvqa", "data": annotations},
                                                                indent=1), encoding="utf-8")
        counts["eval_textvqa"] = len(questions)

        caps = [{"id": sid, "image": _save_image(ev, sid, data), "captions": t["captions"]}
                for sid, data, t in _items("eval_caption", cfg.eval_caption, cfg, pool)]
        write_jsonl(ev / "captions.jsonl", caps)
        counts["eval_caption"] = len(caps)

        lines = ["\t".join(("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"))]
        for index, (sid, data, t) in enumerate(_items("eval_mmbench", cfg.eval_mmbench, cfg, pool)):
            fields = [str(index), t["question"], t["hint"], t["A"], t["B"], t["C"], t["D"], t["answer"],
                      t["category"], base64.b64encode(data).decode("ascii")]
            lines.append("\t".join(fields))
        (ev / "mmbench.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts["eval_mmbench"] = cfg.eval_mmbench
    return counts


def world_text_corpus(n: int, seed: int) -> list[str]:
    """n world texts for language-model pretraining: sentences (captions, questions, answers, prompts)
    and chat rounds in the LM's template about a scene described in words (an instruction-tuned LM,
    as gemma-2b-it is: it answers from its context, which stage 1 teaches the image tokens to supply).

    Drawn from their own RNG stream, so the LM never sees the eval scenes' texts verbatim.
    """
    out: list[str] = []
    i = 0
    while len(out) < n:
        rng = item_rng(seed, CORPUS_STREAM, i)
        scene = sample_scene(rng)
        out.append(text.dense_caption(scene, rng))
        out.append(text.web_caption(scene, rng, 0.0))
        qa = text.textvqa_item(scene, rng)
        out.append(f"{qa['question']} {qa['answer']}")
        out += [t["value"].removeprefix("<image>\n") for t in text.instruct_conversation(scene, rng)]
        out += text.described_scene_chats(scene, rng)
        i += 1
    return out[:n]


def world_chat_corpus(n: int, seed: int) -> list[str]:
    """n chat rounds in the LM's template, each about a scene described in words in its question
    (`text.described_scene_chats`): an instruction-tuned LM's corpus. Every use of the LM in a VLM is
    such a round, and a small LM learns to read its answer from the context only when rounds are all
    it sees (world_text_corpus's sentences dilute them: measured in the issue log, zoo.lm_corpus)."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        rng = item_rng(seed, CORPUS_STREAM, i)
        out += text.described_scene_chats(sample_scene(rng), rng)
        i += 1
    return out[:n]


def web_captions(rows: list[dict], seed: int, noise_rate: float) -> dict[str, str]:
    """The seed set's kind of caption for each caption-eval image: the world's web alt-text of the same scene.

    The eval scene is re-drawn from its own stream, the alt-text from a sub-stream of that item, so
    the references are untouched. rows: {"id", ...} of the caption eval set this world wrote."""
    out = {}
    for r in rows:
        index = item_index("eval_caption", r["id"])
        scene = sample_scene(split_rng(seed, "eval_caption", index))
        out[r["id"]] = text.web_caption(scene, split_rng(seed, "eval_caption", index, 1), noise_rate)
    return out
