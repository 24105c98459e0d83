"""params.yaml, strictly typed: one schema per section, checked before any stage does heavy work.

A misspelt key (`world.raw_sizee`), a value of the wrong type (`runs.baseline.lr=abc`) or a
missing key is one line naming `section.key`, with a close match when there is one. Defaults
live in params.yaml only: the schema says what a key must be, never what it is when absent.

To add a knob: add it to params.yaml (with its comment) and one line to its section below.
"""
from __future__ import annotations

import difflib
import os
import re
from typing import Any, Callable

from vlmlab import io

Check = Callable[[Any, str], Any]  # (value, dotted key) -> the value (ints widened to float for numbers)


class ParamError(io.StageError):
    pass


def _bad(key: str, value: Any, want: str) -> ParamError:
    return ParamError(f"error: params.yaml: {key} = {value!r} ({type(value).__name__}): expected {want}")


# PyYAML reads YAML 1.1, where `1e-3` (no dot) is a string; a number is what the user meant
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def integer(low: int | None = None) -> Check:
    def check(value, key):
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            raise _bad(key, value, "an integer" + (f" >= {low}" if low is not None else ""))
        return value
    return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False) -> Check:
    def check(value, key):
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            bounds = [f"{'>' if low_open else '>='} {low:g}" if low is not None else "",
                      f"<= {high:g}" if high is not None else ""]
            raise _bad(key, value, " ".join(["a number", *filter(None, bounds)]))
        return float(value)
    return check


def text(*choices: str) -> Check:
    def check(value, key):
        if not isinstance(value, str) or (choices and value not in choices):
            raise _bad(key, value, f"one of {', '.join(map(repr, choices))}" if choices else "a string")
        return value
    return check


def flag() -> Check:
    def check(value, key):
        if not isinstance(value, bool):
            raise _bad(key, value, "true or false")
        return value
    return check


def texts(nonempty: bool = True) -> Check:
    def check(value, key):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (nonempty and not value):
            raise _bad(key, value, "a non-empty list of strings" if nonempty else "a list of strings")
        return value
    return check


def record(schema: dict[str, Check], optional: tuple[str, ...] = ()) -> Check:
    """A mapping with exactly these keys (those in `optional` may be absent)."""
    def check(value, key):
        if not isinstance(value, dict):
            raise _bad(key, value, f"a mapping with keys {', '.join(schema)}")
        for k in value:
            if k not in schema:
                close = difflib.get_close_matches(str(k), list(schema), n=1)
                hint = f"did you mean {key}.{close[0]}?" if close else f"known: {', '.join(schema)}"
                raise ParamError(f"error: params.yaml: unknown key {key}.{k} ({hint})")
        missing = [k for k in schema if k not in value and k not in optional]
        if missing:
            raise ParamError(f"error: params.yaml: missing key {key}.{missing[0]} (every knob is set in params.yaml)")
        return {k: schema[k](v, f"{key}.{k}") for k, v in value.items()}
    return check


def mapping(of: Check) -> Check:
    """name -> value, names free (e.g. runs, evaluate.models)."""
    def check(value, key):
        if not isinstance(value, dict):
            raise _bad(key, value, "a mapping of names")
        return {k: of(v, f"{key}.{k}") for k, v in value.items()}
    return check


PATH = text()
POS = integer(1)
COUNT = integer(0)
SECONDS = number(0, low_open=True)
LR = number(0, low_open=True)
RATIO = number(0, 1)

RUN = record({
    "data": text("raw", "enhanced"),
    "strategy": text("full", "lora"),
    "lr": LR,                       # stage-2 learning rate
    "lora_r": POS, "lora_alpha": number(0, low_open=True), "lora_dropout": number(0, 1),
}, optional=("lora_r", "lora_alpha", "lora_dropout"))

SECTIONS: dict[str, Check] = {
    "seed": COUNT,
    "world": record({
        "raw_size": POS, "curated_size": POS, "instruct_size": POS, "eval_textvqa": POS, "eval_caption": POS,
        "eval_mmbench": POS, "image_size": POS, "noise_rate": RATIO, "jpeg_quality": integer(1),
    }),
    "data": record({"source": text("world", "path"), "path": PATH, "jsonl": PATH, "stage1_json": PATH}),
    "analyze": record({"top_words": POS, "char_bin": POS}),
    "model": record({"preset": text("tiny", "mgm-2b"),
                     "attn_implementation": text("eager", "sdpa", "flash_attention_2")}),
    "zoo": record({
        "source": text("tiny", "local", "random"), "lm_corpus": text("chats", "mixed"), "lm_texts": POS,
        "lm_heldout_texts": POS, "lm_steps": POS, "lm_batch_size": POS, "lm_lr": LR,
        "lm_init_std": number(0, low_open=True), "lm_answer_weight": number(0),
        "vit_images": POS, "vit_steps": POS, "vit_lr": LR,
        "convnext_images": POS, "convnext_steps": POS, "convnext_lr": LR, "convnext_word_weight": number(0),
        "tower_batch_size": POS, "heldout_images": POS, "local_mgm": PATH, "local_llm": PATH, "local_vision": PATH,
        "local_vision_aux": PATH, "local_image_size_aux": POS, "local_mm_projector": PATH, "threads": POS,
        "parallel": flag(), "monitor_interval": SECONDS,
    }),
    "teacher": record({
        "image_size": POS, "patch_size": POS, "vision_hidden": POS, "vision_layers": POS, "qformer_hidden": POS,
        "qformer_layers": POS, "num_query_tokens": POS, "encoder_images": COUNT, "encoder_steps": POS, "encoder_lr": LR, "hidden": POS, "layers": POS, "heads": POS, "epochs": POS,
        "batch_size": POS, "lr": LR, "max_words": POS, "temperature": number(0, low_open=True), "top_k": POS,
        "threads": POS, "eval_limit": COUNT, "eval_batch_size": POS, "eval_samples": POS, "monitor_interval": SECONDS,
    }),
    "synth": record({
        "captioner": PATH, "captioner_op": text("fast", "stock"), "trust_remote_code": flag(), "caption_num": POS,
        "keep_candidate_mode": text("all", "random_any", "similar_one_simhash"), "keep_original_sample": flag(),
        "gpu_batch_size": POS, "batch_size": POS, "np": POS, "mapper_memory": text(), "min_words": COUNT,
        "max_words": POS, "word_rep_len": POS, "max_word_rep_ratio": RATIO, "char_rep_len": POS,
        "max_char_rep_ratio": RATIO, "min_text_len": COUNT, "max_text_len": POS, "itm_model": PATH,
        "min_itm_score": RATIO, "clip_model": PATH, "min_clip_score": number(-1, 1),
        "dedup_method": text("", "phash", "dhash", "whash", "ahash"), "trace_sample": COUNT,
        "executor": text("default", "ray"), "monitor_interval": SECONDS,
    }),
    "train": record({
        "launcher": text(), "stage1_epochs": number(0, low_open=True), "stage1_lr": LR, "stage1_global_batch": POS,
        "stage1_micro_batch": POS, "stage1_warmup_ratio": RATIO, "stage1_scheduler": text(),
        "stage2_epochs": number(0, low_open=True), "stage2_global_batch": POS, "stage2_micro_batch": POS,
        "stage2_warmup_ratio": RATIO, "stage2_scheduler": text(), "lora_targets": texts(),
        "gradient_checkpointing": flag(), "attn_implementation": text("eager", "sdpa", "flash_attention_2"),
        "deepspeed": PATH, "cuda_deterministic": flag(), "group_by_length": flag(), "save_steps": COUNT, "workers": COUNT, "max_length": COUNT,
        "monitor_interval": SECONDS, "frozen_bf16": flag(), "loss_impl": text("chunked", "liger", "full"),
        "liger_kernels": flag(), "towers_no_grad": flag(), "upsample_matmul": flag(), "fused_mining": flag(),
        "mining_matmul": flag(), "dedup_towers": flag(), "group_images": flag(), "fused_adamw": flag(), "no_host_syncs": flag(),
        "cuda_workers": COUNT,
    }),
    "runs": mapping(RUN),
    "merge": record({"runs": texts(nonempty=False), "tolerance": number(0, low_open=True),
                     "saved_tolerance": number(0, low_open=True), "samples": POS, "batch_size": POS}),
    "evaluate": record({
        "models": mapping(PATH), "textvqa_questions": PATH, "textvqa_annotations": PATH, "textvqa_images": PATH,
        "captions": PATH, "caption_images": PATH, "mmbench": PATH, "caption_prompt": text(), "batch_size": POS,
        "textvqa_max_new_tokens": POS, "caption_max_new_tokens": POS, "mmbench_max_new_tokens": POS,
        "limit": COUNT, "prefix_batch": COUNT, "compile": flag(), "threads": COUNT, "monitor_interval": SECONDS,
        "bootstrap_samples": POS, "bootstrap_seed": COUNT, "ci_level": number(0, 1, low_open=True),
        "blind_control": flag(),
    }),
    "compare": record({"metric": text(), "datasets": texts(), "strategies": texts(), "merge_tolerance": number(0)}),
}


def check_run(name: str, run: Any) -> dict:
    """One entry of `runs:`; a LoRA run sets its adapter's knobs itself."""
    run = RUN(run, f"runs.{name}")
    if run["strategy"] == "lora":
        for k in ("lora_r", "lora_alpha", "lora_dropout"):
            if k not in run:
                raise ParamError(f"error: params.yaml: missing key runs.{name}.{k} (a lora run sets its adapter)")
    return run


def check_section(name: str, value: Any) -> Any:
    return check_run(name.split(".", 1)[1], value) if name.startswith("runs.") else SECTIONS[name](value, name)


def validate(params: Any) -> dict:
    """The whole params.yaml, typed; raises ParamError (one line) on the first problem."""
    if not isinstance(params, dict):
        raise ParamError(f"error: params.yaml: expected a mapping of sections, got {type(params).__name__}")
    for name in params:
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            raise ParamError(f"error: params.yaml: unknown section {name}"
                             + (f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(SECTIONS)})"))
    missing = [s for s in SECTIONS if s not in params]
    if missing:
        raise ParamError(f"error: params.yaml: missing section {missing[0]}")
    out = {name: SECTIONS[name](value, name) for name, value in params.items()}
    for name, run in out["runs"].items():
        check_run(name, run)
    for run in out["merge"]["runs"]:
        if out["runs"].get(run, {}).get("strategy") != "lora":
            raise ParamError(f"error: params.yaml: merge.runs names {run!r}, which is not a lora entry of runs")
    return out


def load(path: str | os.PathLike = "params.yaml") -> dict:
    """params.yaml read and validated: what every stage calls first."""
    try:
        return validate(io.load_params(path))
    except ParamError as e:
        if str(path) == "params.yaml":
            raise
        raise ParamError(e.message.replace("params.yaml:", f"{path}:", 1)) from None
