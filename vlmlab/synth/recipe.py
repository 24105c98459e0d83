"""Render the synthesis recipe: an ordinary Data-Juicer config, written from params.yaml's `synth` section.

The file it writes (configs/recipes/synthesize.yaml) runs as it is with
`dj-process --config configs/recipes/synthesize.yaml` (or Data-Juicer's Ray executor with
`--executor_type ray`); `vlmlab.synth.run` runs the same file in-process. Ops, in order:
  fast_image_captioning_mapper (synth.captioner_op: fast; ours, vlmlab/synth/ops/, a Data-Juicer custom
                            operator) or image_captioning_mapper (stock): N seed images -> caption_num
                            captions each (keep_candidate_mode: all)
  words_num_filter, word_repetition_filter, character_repetition_filter, text_length_filter
  image_text_matching_filter / image_text_similarity_filter   only when a model path is given
  image_deduplicator        only when a method is given (needs imagededup, not installed by default)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from vlmlab import io


CAPTIONER_OPS = {"fast": "fast_image_captioning_mapper", "stock": "image_captioning_mapper"}
FAST_OP_FILE = Path(__file__).parent / "ops" / "fast_image_captioning_mapper.py"  # registered by Data-Juicer from its path


def op_path(path: Path) -> str:
    """`path` relative to the working directory when under it (a recipe rendered in the repository stays
    the same on every machine), else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


@dataclass
class SynthConfig:
    captioner: str = ""  # local BLIP-2 folder; "" = the teacher stage's models/teacher
    captioner_op: str = "fast"  # fast: fast_image_captioning_mapper (ours, same semantics) | stock: image_captioning_mapper
    caption_num: int = 3  # captions generated per image
    keep_candidate_mode: str = "all"  # all: every caption becomes a sample (10k -> 30k); random_any | similar_one_simhash
    keep_original_sample: bool = False  # the study drops the noisy seed captions
    trust_remote_code: bool = True  # lets the tiny teacher use its fast sampler (custom_generate/); same distribution
    gpu_batch_size: int = 128  # images per generate() call (the op's sub-batch), on the CPU too
    batch_size: int = 1024  # samples per op call (Data-Juicer's map batch); a multiple of gpu_batch_size
    np: int = 2  # Data-Juicer worker processes
    mapper_memory: str = "2GB"  # the captioner's memory per worker: Data-Juicer runs min(np, free / this) workers
    min_words: int = 8  # words_num_filter
    max_words: int = 80
    word_rep_len: int = 4  # word_repetition_filter: n-gram length ...
    max_word_rep_ratio: float = 0.3  # ... and the share of repeated n-grams allowed
    char_rep_len: int = 10  # character_repetition_filter
    max_char_rep_ratio: float = 0.5
    min_text_len: int = 40  # text_length_filter, in characters (of the whole DJ text)
    max_text_len: int = 600
    itm_model: str = ""  # image_text_matching_filter: local BLIP ITM folder (e.g. blip-itm-base-coco); "" = off
    min_itm_score: float = 0.003
    clip_model: str = ""  # image_text_similarity_filter: local CLIP folder; "" = off
    min_clip_score: float = 0.1
    dedup_method: str = ""  # image_deduplicator: phash | dhash | whash | ahash; "" = off (needs imagededup)
    trace_sample: int = 20  # before/after records kept per op in trace_sample.jsonl
    executor: str = "default"  # default | ray (Data-Juicer's executor_type)
    ray_address: str = "auto"  # with executor ray: a running cluster ("auto") or "local" (starts one in-process)
    monitor_interval: float = 0.5  # seconds between memory/CPU samples of the stage

    @classmethod
    def from_params(cls, section: dict) -> "SynthConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise io.fail(f"params.yaml synth: unknown keys {unknown}; known: {sorted(known)}")
        cfg = cls(**section)
        if cfg.keep_candidate_mode not in ("all", "random_any", "similar_one_simhash"):
            raise io.fail(f"params.yaml synth.keep_candidate_mode={cfg.keep_candidate_mode!r}: "
                          "use all, random_any or similar_one_simhash")
        if cfg.captioner_op not in CAPTIONER_OPS:
            raise io.fail(f"params.yaml synth.captioner_op={cfg.captioner_op!r}: use {' or '.join(CAPTIONER_OPS)}")
        if cfg.executor not in ("default", "ray"):
            raise io.fail(f"params.yaml synth.executor={cfg.executor!r}: use default or ray")
        return cfg


def process_list(cfg: SynthConfig, captioner: str) -> list[dict]:
    """Data-Juicer's `process:` list, one single-key dict per op."""
    ops = [
        {CAPTIONER_OPS[cfg.captioner_op]: {
            "hf_img2seq": captioner, "trust_remote_code": cfg.trust_remote_code, "caption_num": cfg.caption_num,
            "keep_candidate_mode": cfg.keep_candidate_mode, "keep_original_sample": cfg.keep_original_sample,
            "gpu_batch_size": cfg.gpu_batch_size, "batch_size": cfg.batch_size, "memory": cfg.mapper_memory}},
        {"words_num_filter": {"lang": "en", "tokenization": False, "min_num": cfg.min_words, "max_num": cfg.max_words}},
        {"word_repetition_filter": {"lang": "en", "tokenization": False, "rep_len": cfg.word_rep_len,
                                    "min_ratio": 0.0, "max_ratio": cfg.max_word_rep_ratio}},
        {"character_repetition_filter": {"rep_len": cfg.char_rep_len, "min_ratio": 0.0,
                                         "max_ratio": cfg.max_char_rep_ratio}},
        {"text_length_filter": {"min_len": cfg.min_text_len, "max_len": cfg.max_text_len}},
    ]
    if cfg.itm_model:
        ops.append({"image_text_matching_filter": {"hf_blip": cfg.itm_model, "min_score": cfg.min_itm_score,
                                                   "max_score": 1.0, "any_or_all": "any"}})
    if cfg.clip_model:
        ops.append({"image_text_similarity_filter": {"hf_clip": cfg.clip_model, "min_score": cfg.min_clip_score,
                                                     "max_score": 1.0, "any_or_all": "any"}})
    if cfg.dedup_method:
        # consider_text: the same image legitimately carries caption_num captions; drop only repeated pairs
        ops.append({"image_deduplicator": {"method": cfg.dedup_method, "consider_text": True}})
    return ops


def render_recipe(cfg: SynthConfig, *, captioner: str, dataset_path: str, export_path: str, work_dir: str) -> dict:
    """The recipe as a dict (paths as given: relative to the repository root when run from there)."""
    return {
        "project_name": "vlmlab-synthesize",
        "executor_type": cfg.executor,
        **({"ray_address": cfg.ray_address} if cfg.executor == "ray" else {}),
        "dataset_path": dataset_path,
        "export_path": export_path,
        "work_dir": work_dir,
        "np": cfg.np,
        "text_keys": "text",
        "image_key": "images",
        "image_special_token": "<__dj__image>",
        "eoc_special_token": "<|__dj__eoc|>",
        "use_cache": False,  # one pass; caching 30k rows per op only costs disk and time here
        "open_tracer": True,
        "trace_num": 10**9,  # trace every drop: per-op counts and rejects.jsonl come from it
        "skip_op_error": False,  # Data-Juicer's default (true) silently drops a whole batch on one bad image
        "op_fusion": False,
        **({"custom_operator_paths": [op_path(FAST_OP_FILE)]} if cfg.captioner_op == "fast" else {}),
        "process": process_list(cfg, captioner),
    }


HEADER = """\
# Rendered by stages/synthesize.py from params.yaml (synth section): edit params, not this file.
# Runs as it is from the repository root: dj-process --config {path}
# (dataset_path is written by the stage: the seed rows whose images decode; see vlmlab/synth/run.py).
# 10k seed images -> {captioner} ({caption_num} captions each, originals dropped) -> quality filters.
# Data-Juicer has no seed option: the stage calls torch.manual_seed({seed}) (+ random, numpy) before the run.
"""


def write_recipe(recipe: dict, path: str | Path, seed: int) -> Path:
    path = Path(path)
    (captioner, args), = recipe["process"][0].items()
    text = HEADER.format(path=path, captioner=captioner, caption_num=args["caption_num"], seed=seed) + yaml.safe_dump(recipe, sort_keys=False)
    io.write_text(path, text)
    return path
