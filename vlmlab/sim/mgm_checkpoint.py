"""The tiny base MGM saved as the official code saves a checkpoint (dvlab-research/MGM), for the real converter.

`zoo` pretrains the tiny parts, writes them here in MGM's layout and hands the folder to
`models.convert` exactly as `zoo.local_mgm` hands it an official MGM-2B folder:

  <root>/model_zoo/OpenAI/clip-vit-tiny-patch8-32/  the low-res tower as MGM's `mm_vision_tower` names one:
                                                    a transformers CLIP folder (config.json, weights,
                                                    preprocessor_config.json); MGM builds the tower from it
  <root>/model_zoo/OpenAI/openclip-convnext-tiny/   the high-res tower as `mm_vision_tower_aux` names one:
                                                    OpenCLIP's open_clip_config.json + open_clip_pytorch_model.bin
                                                    (the timm trunk as `visual.trunk.{stem,stages}.*`)
  <root>/work_dirs/MGM-tiny/                        the MGM checkpoint: config.json in MGM's format (model_type
                                                    mgm_gemma, the LM's keys flat, the mm_* keys), model.safetensors
                                                    under MGM's key names, the LM's tokenizer (no <image>: MGM
                                                    marks images with -200)

The tower paths in config.json are absolute, as in the challenge's own MGM-2B config
(fixtures: better_synth/mgm_2b_pretrain_config.json).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from vlmlab.io import write_json
from vlmlab.models import convert, presets
from vlmlab.models.mgm import MgmForConditionalGeneration
from vlmlab.models.processor import CLIP_MEAN, CLIP_STD

CLIP_FOLDER = "model_zoo/OpenAI/clip-vit-tiny-patch8-32"   # "openai" in the name: MGM's builder picks CLIPVisionTower
OPENCLIP_FOLDER = "model_zoo/OpenAI/openclip-convnext-tiny"  # "openclip": OpenCLIPVisionTower
MGM_FOLDER = "work_dirs/MGM-tiny"
# transformers 5 spells the exact (erf) GELU "gelu_python"; MGM-2B's config (transformers 4.38) says "gelu"
_MGM_ACT = {presets.EXACT_GELU: "gelu"}


def mgm_config(model: MgmForConditionalGeneration, tokenizer, clip: Path, openclip: Path) -> dict:
    """config.json as MGM's MGMGemmaForCausalLM.save_pretrained writes it (keys of MGM-2B's)."""
    c, text = model.config, model.config.text_config
    if text.model_type != "gemma":
        raise ValueError(f"the tiny world's LM is a Gemma (MGM-2B's); got {text.model_type!r}")
    return {
        "architectures": ["MGMGemmaForCausalLM"], "model_type": "mgm_gemma",
        "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "head_dim": text.head_dim,
        "hidden_act": _MGM_ACT.get(text.hidden_act, text.hidden_act),
        "max_position_embeddings": text.max_position_embeddings, "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"], "rope_scaling": None, "attention_bias": text.attention_bias,
        "attention_dropout": text.attention_dropout, "initializer_range": text.initializer_range,
        # the LM's own ids, as the Gemma config MGM starts from has them (the chat template's stop is the processor's)
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "image_aspect_ratio": c.image_aspect_ratio, "image_grid": 1, "image_grid_pinpoints": None,
        "image_global": False, "image_size_aux": c.image_size_aux,
        "mm_hidden_size": c.vision_config.hidden_size, "mm_hidden_size_aux": c.mm_hidden_size_aux,
        "mm_projector_type": c.mm_projector_type, "mm_projector_lr": None,
        "mm_vision_select_layer": c.mm_vision_select_layer, "mm_vision_select_feature": c.mm_vision_select_feature,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "mm_vision_tower": str(clip), "mm_vision_tower_aux": str(openclip),
        "optimize_vision_tower": False, "optimize_vision_tower_aux": False,
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "use_mm_proj": True,
        "tokenizer_model_max_length": tokenizer.model_max_length, "tokenizer_padding_side": "right",
        "torch_dtype": str(model.dtype).removeprefix("torch."), "transformers_version": transformers.__version__,
        "use_cache": True,
    }


def _openclip_tower(model: MgmForConditionalGeneration, folder: Path) -> None:
    """OpenCLIP's folder: the ConvNeXt trunk under `visual.trunk.*` in timm's names (MGM keeps stem + stages)."""
    aux = model.config.vision_aux_config
    state = {}
    for key, tensor in model.vision_tower_aux.state_dict().items():
        mgm_key = convert.ours_key_to_mgm("vision_tower_aux." + key)   # model.vision_tower_aux.vision_{stem,stages}.*
        state["visual.trunk." + mgm_key.removeprefix("model.vision_tower_aux.vision_")] = tensor.clone()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    # the trunk has no timm name (it is no released size): its shapes are the weights'
    write_json(folder / "open_clip_config.json", {
        "model_cfg": {"vision_cfg": {"image_size": aux.image_size, "timm_model_name": None,
                                     "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
                                     "timm_drop": 0.0, "timm_drop_path": 0.0}},
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}})


def write_official_mgm(model: MgmForConditionalGeneration, tokenizer, root: str | Path) -> Path:
    """Save `model` (and the LM's `tokenizer`, without <image>) in MGM's layout under `root`.
    Returns the MGM checkpoint folder (what zoo.local_mgm names)."""
    root = Path(root).resolve()
    clip, openclip, mgm = root / CLIP_FOLDER, root / OPENCLIP_FOLDER, root / MGM_FOLDER
    if "<image>" in tokenizer.get_vocab():
        raise ValueError("an MGM checkpoint's tokenizer has no <image> token (MGM marks images with -200)")
    # a copy: save_pretrained stamps architectures/dtype onto the config it saves, here the model's own sub-config
    copy.deepcopy(model.vision_tower).save_pretrained(clip)
    side = model.config.vision_config.image_size
    # as openai/clip-vit-large-patch14-336 ships it (MGM's tower reads its image processor from here)
    write_json(clip / "preprocessor_config.json", {
        "crop_size": side, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "resample": 3, "size": side})
    _openclip_tower(model, openclip)
    mgm.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(mgm)
    state = {convert.ours_key_to_mgm(k): v.contiguous().clone() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "language_model.lm_head.weight")}  # tied: saved once
    save_file(state, str(mgm / "model.safetensors"), metadata={"format": "pt"})
    (mgm / "config.json").write_text(json.dumps(mgm_config(model, tokenizer, clip, openclip), indent=2) + "\n",
                                     encoding="utf-8")
    return mgm
