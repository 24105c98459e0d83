"""Fold a LoRA adapter into its base and prove the result computes the same function.

The fold happens in fp32 (bf16 rounding of W + s·BA would already move logits) and is
compared with the adapter model on held-out samples: the largest |logit difference| over
every non-padding position is the stage's metric, and the stage fails above a tolerance.
The merged model is then saved in the training dtype as a plain HF folder (loadable without
peft), reloaded from disk and checked again. Non-finite logits (a corrupted adapter) fail.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from vlmlab import io
from vlmlab.models.load import load_model


def load_adapter_model(adapter_dir: str | Path, base_dir: str | Path | None = None):
    """(peft model in fp32, eval mode, base folder) from an adapter folder; base from its config if not given."""
    adapter_dir = Path(adapter_dir)
    conf_path = adapter_dir / "adapter_config.json"
    if not conf_path.is_file():
        raise io.fail(f"{adapter_dir}: no adapter_config.json, not a LoRA adapter folder (merge only applies to lora runs)")
    base_dir = Path(base_dir or json.loads(conf_path.read_text())["base_model_name_or_path"])
    model, _ = load_model(adapter_dir, dtype=torch.float32, base=base_dir)
    return model, base_dir


def held_out_batches(path: str | Path, processor, n: int, batch_size: int) -> list[dict]:
    """The first `n` usable held-out samples as padded batches.

    Reads eval captions jsonl (`{"id", "image", "captions"}`: the first reference becomes the
    answer) or a LLaVA json; image paths relative to the file's folder. Rows whose image is
    missing are skipped; fails if no row is usable.
    """
    from vlmlab.data.collate import PadCollator, read_llava_json

    path = Path(path)
    if not path.is_file():
        raise io.fail(f"{path}: held-out samples not found (run `dvc repro prepare`)")
    rows = io.read_jsonl(path) if path.suffix == ".jsonl" else read_llava_json(path)
    samples = []
    for row in rows:
        if len(samples) == n:
            break
        conv = row.get("conversations") or [{"from": "human", "value": "<image>\nDescribe the image."},
                                            {"from": "gpt", "value": (row.get("captions") or [""])[0]}]
        image_path = path.parent / row.get("image", "")
        if not image_path.is_file():
            continue  # skipped: later rows make up the n; only no usable sample at all stops the stage
        samples.append(processor.encode_conversation(conv, image_path))
    if not samples:  # nothing to compare: the merge check would pass on no logits at all
        raise io.fail(f"{path}: no usable held-out sample, nothing to check the merge on "
                      f"(merge.samples = {n}; images looked up under {path.parent})")
    collate = PadCollator(processor.tokenizer.pad_token_id)
    return [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


@torch.no_grad()
def logits_on(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """fp32 logits at every non-padding position of each batch: [(n_tokens, V)]."""
    model.eval()
    out = []
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"], pixel_values_aux=b["pixel_values_aux"]).logits
        out.append(logits.float()[b["attention_mask"].bool()].cpu())
    return out


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a - b| over all batches; NaN if either side is not finite (it must fail, not pass silently)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            return float("nan")
        worst = max(worst, (x - y).abs().max().item())
    return worst


def check_tolerance(diff: float, tolerance: float, where: str) -> None:
    if not math.isfinite(diff) or diff > tolerance:
        raise io.fail(f"{where}: merged model disagrees with the adapter: max |logit diff| = {diff:.3g} > tolerance "
                      f"{tolerance:g} (corrupted adapter or a bad fold; retrain, or raise merge.tolerance for bf16 saves)")


def merge_and_check(adapter_dir: str | Path, out: str | Path, batches: list[dict], tolerance: float,
                    save_dtype: torch.dtype = torch.float32, processor=None, base_dir: str | Path | None = None,
                    saved_tolerance: float | None = None) -> dict:
    """Fold `adapter_dir` into its base, save to `out` (only if both checks pass) -> metrics.

    Two checks against the adapter's fp32 logits: the fold itself (merged fp32 model, within
    `tolerance`), and the folder as saved and reloaded (within `tolerance` for an fp32 save,
    `saved_tolerance` for bf16, whose weight rounding alone moves logits).
    """
    import vlmlab.models  # noqa: F401
    from transformers import AutoModelForImageTextToText

    model, base_dir = load_adapter_model(adapter_dir, base_dir)
    reference = logits_on(model, batches)                 # the adapter as trained, fp32
    merged = model.merge_and_unload()                     # W + (alpha/r)·B·A, in fp32
    diff = max_abs_diff(reference, logits_on(merged, batches))
    check_tolerance(diff, tolerance, f"{adapter_dir} (fp32 fold)")
    if save_dtype == torch.float32 or saved_tolerance is None:
        saved_tolerance = tolerance
    with io.atomic_path(out) as tmp:
        merged.to(save_dtype).save_pretrained(str(tmp))
        if processor is not None:
            processor.save_pretrained(str(tmp))
        # reload what was written, without peft, as every later stage will
        reloaded = AutoModelForImageTextToText.from_pretrained(str(tmp), dtype=torch.float32)
        diff_saved = max_abs_diff(reference, logits_on(reloaded, batches))
        check_tolerance(diff_saved, saved_tolerance, f"{adapter_dir} (saved as {str(save_dtype).split('.')[-1]})")
    return {
        "max_logit_diff": diff,               # adapter vs fp32 fold
        "max_logit_diff_saved": diff_saved,   # adapter vs the saved folder, reloaded
        "tolerance": tolerance,
        "saved_tolerance": saved_tolerance,
        "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "positions": sum(int(r.shape[0]) for r in reference),
        "params": sum(p.numel() for p in reloaded.parameters()),
    }
