"""Load a saved MGM: one loader for training, merging, evaluation and the inference CLI.

A folder is a base/full/merged MGM (config.json + weights + MgmProcessor files) or a peft LoRA
adapter (adapter_config.json naming its base, a path relative to the repository root).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vlmlab.io import fail
from vlmlab.models.mgm import MgmForConditionalGeneration
from vlmlab.models.processor import CONFIG_NAME, MgmProcessor

REPO = Path(__file__).resolve().parents[2]  # adapter configs name their base relative to the repository root
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


def load_model(path: str | os.PathLike, dtype=None, attn_implementation: str | None = None, device: str = "cpu",
               base: str | os.PathLike | None = None):
    """A base/full/merged MGM folder, or a peft LoRA adapter folder -> (model in eval mode, MgmProcessor).

    An adapter goes onto `base` if given, else onto the folder its adapter_config.json names."""
    folder = _resolve(path)
    if not folder.is_dir():
        raise fail(f"{path}: no such model folder (give models/zoo, models/runs/<run> or models/merged/<run>)")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise fail(f"dtype {dtype!r} unknown; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    adapter_cfg = folder / "adapter_config.json"
    try:
        if adapter_cfg.is_file():
            from peft import PeftModel

            base_ref = str(base or json.loads(adapter_cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") or "")
            base = _resolve(base_ref)
            if not base_ref or not (base / "config.json").is_file():
                raise fail(f"{adapter_cfg}: base_model_name_or_path {base_ref!r} is not a model folder here "
                           "(it must be a path relative to the repository root, e.g. models/zoo)")
            model = MgmForConditionalGeneration.from_pretrained(str(base), **kwargs)
            model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        elif (folder / "config.json").is_file():
            model = MgmForConditionalGeneration.from_pretrained(str(folder), **kwargs)
        else:
            raise fail(f"{folder}: neither config.json (an MGM folder) nor adapter_config.json (a LoRA adapter)")
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        # a peft adapter built for another base, or a folder that is not an MGM: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise fail(f"{folder}: cannot load this model/adapter ({type(e).__name__}: {first[:300]})") from None
    # an adapter folder may carry no processor of its own: its base's
    proc_dir = base if adapter_cfg.is_file() and not (folder / CONFIG_NAME).is_file() else folder
    if not (proc_dir / CONFIG_NAME).is_file():
        raise fail(f"{folder}: no {CONFIG_NAME} beside the model (save it with MgmProcessor.save_pretrained)")
    processor = MgmProcessor.from_pretrained(proc_dir)
    return model.to(device).eval(), processor


def on_gpu() -> bool:
    return torch.cuda.is_available()


def training_dtype() -> torch.dtype:
    """The dtype models are trained and saved in: bf16 on CUDA (mixed precision, fp32 master weights), fp32 on CPU."""
    return torch.bfloat16 if on_gpu() else torch.float32
