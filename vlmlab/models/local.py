"""Real checkpoints on this disk -> the base MGM every run starts from (zoo.source: local).

An official MGM folder is converted (vlmlab/models/convert.py); or Gemma + CLIP + OpenCLIP ConvNeXt
folders are assembled with a fresh projector and mining (MGM's stage 1 trains them); a stage-1
mm_projector.bin may go on top. Nothing is downloaded: every path must exist locally.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from vlmlab.io import fail
from vlmlab.models import convert, presets
from vlmlab.models.mgm import CONNECTOR_MODULES
from vlmlab.models.processor import MgmProcessor


def param_counts(model: nn.Module) -> dict[str, int]:
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def build_local(p: dict, attn_implementation: str):
    """Real checkpoints on this disk: an official MGM folder (converted), or Gemma + CLIP +
    OpenCLIP ConvNeXt folders (assembled, projector and mining fresh), optionally with a
    stage-1 mm_projector.bin on top. Returns (model, processor, metrics)."""

    def need(key: str) -> Path:
        path = Path(str(p.get(key) or ""))
        if not str(p.get(key) or "") or not path.exists():
            raise fail(f"zoo.{key} = {p.get(key)!r}: no such local path (zoo.source=local never downloads; "
                       f"set it with `dvc exp run -S zoo.{key}=/path`)")
        return path

    report: dict = {}
    if p.get("local_mgm"):
        folder = need("local_mgm")
        model, rep = convert.convert_mgm(folder)
        tok_dir = folder
        report["mgm"] = rep
    else:
        llm, vision, aux = need("local_llm"), need("local_vision"), need("local_vision_aux")
        text_config = AutoConfig.from_pretrained(str(llm))
        if text_config.model_type == "gemma":  # as MGM-2B ran it (AutoConfig rewrote "gelu" to tanh)
            text_config.hidden_act = convert.gemma_activation(json.loads((llm / "config.json").read_text()))
        vision_model = CLIPVisionModel.from_pretrained(str(vision))
        state = convert.read_state_dict(aux)
        # OpenCLIP stores the timm trunk as visual.trunk.{stem,stages}.*; MGM renames them vision_{stem,stages}
        timm = {"vision_" + k.split("visual.trunk.", 1)[1]: v for k, v in state.items()
                if k.startswith(("visual.trunk.stem.", "visual.trunk.stages."))}
        aux_config = convert.convnext_config_from_state(timm, "", int(p.get("local_image_size_aux") or 768))
        if aux_config is None:
            raise fail(f"{aux}: no OpenCLIP ConvNeXt trunk (visual.trunk.stem/stages.*) in this checkpoint")
        config = presets.build_config("mgm-2b", text_config=text_config.to_dict(), vision_aux_config=aux_config,
                                      vision_config=vision_model.config.to_dict(), image_size_aux=aux_config["image_size"])
        model = convert.build_uninitialised(config)
        model.vision_tower.load_state_dict(vision_model.state_dict())
        missing, _ = model.language_model.load_state_dict(
            AutoModelForCausalLM.from_pretrained(str(llm)).state_dict(), strict=False)
        if [k for k in missing if k != "lm_head.weight"]:  # a tied head is saved once
            raise fail(f"{llm}: LM weights miss {len(missing)} tensors, e.g. {missing[:3]}")
        model.tie_weights()
        missing, _ = model.vision_tower_aux.load_state_dict(
            {convert.timm_convnext_key(k): v for k, v in timm.items()}, strict=False)
        if missing:
            raise fail(f"{aux}: ConvNeXt weights miss {len(missing)} tensors, e.g. {missing[:3]}")
        for name in CONNECTOR_MODULES:
            getattr(model, name).apply(model._init_weights)  # fresh: MGM's stage 1 trains them
        tok_dir = llm
    if p.get("local_mm_projector"):
        report["mm_projector"] = convert.load_mgm_weights(
            model, convert.read_state_dict(need("local_mm_projector")), partial=True)
    model.config._attn_implementation = attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    for how_found in ("is_local", "local_files_only"):   # transformers 5 would save how it found the files
        tokenizer.init_kwargs.pop(how_found, None)
    processor = MgmProcessor.for_model(tokenizer, model.config)
    model.config.image_token_id = processor.image_token_id
    # the LM stops at the chat template's end of turn too, as presets.build sets a fresh model's
    model.config.text_config.eos_token_id = processor.stop_token_ids
    model.generation_config.eos_token_id = processor.stop_token_ids
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    metrics = {"params": param_counts(model),
               "converted": {k: {"loaded": len(v["loaded"]), "missing": len(v["missing"]), "unused": len(v["unused"])}
                             for k, v in report.items()}}
    return model, processor, metrics
