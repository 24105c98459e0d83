"""Official Mini-Gemini checkpoints -> MgmForConditionalGeneration.

MGM (dvlab-research/MGM) saves its whole model under `model.` plus `lm_head.weight`:
  model.embed_tokens / model.layers.* / model.norm           the LM body (Gemma for MGM-2B)
  model.vision_tower.vision_tower.vision_model.*             CLIP (transformers 4.x CLIPVisionModel)
  model.vision_tower_aux.vision_stem.* / vision_stages.*     ConvNeXt in timm naming (OpenCLIP trunk)
  model.mm_projector.*                                       mlp2x_gelu
  model.vlm_uni_{query,aux,val}_projector.*                  patch info mining
A stage-1 `mm_projector.bin` holds the same names for projector, mining and both towers.
Our modules keep MGM's names; only the LM (a full *ForCausalLM here) and the ConvNeXt
(transformers' ConvNextModel instead of timm) need renaming. Nothing is ever downloaded:
every path must exist locally.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vlmlab.io import fail
from vlmlab.models import presets
from vlmlab.models.mgm import CONNECTOR_MODULES, MgmConfig, MgmForConditionalGeneration

# timm ConvNeXt trunk <-> transformers ConvNextModel (same computation, other names).
# One table, both directions: {i} and {j} stand for stage/block/layer numbers.
_CONVNEXT_NAMES = [
    ("vision_stem.0.", "embeddings.patch_embeddings."),
    ("vision_stem.1.", "embeddings.layernorm."),
    ("vision_stages.{i}.downsample.{j}.", "encoder.stages.{i}.downsampling_layer.{j}."),
    ("vision_stages.{i}.blocks.{j}.conv_dw.", "encoder.stages.{i}.layers.{j}.dwconv."),
    ("vision_stages.{i}.blocks.{j}.norm.", "encoder.stages.{i}.layers.{j}.layernorm."),
    ("vision_stages.{i}.blocks.{j}.mlp.fc1.", "encoder.stages.{i}.layers.{j}.pwconv1."),
    ("vision_stages.{i}.blocks.{j}.mlp.fc2.", "encoder.stages.{i}.layers.{j}.pwconv2."),
    ("vision_stages.{i}.blocks.{j}.gamma", "encoder.stages.{i}.layers.{j}.layer_scale_parameter"),
]


def _rules(pairs, forward: bool) -> list[tuple[str, str]]:
    """(regex, replacement) rules from name templates; a name ending without '.' must match whole."""
    rules = []
    for a, b in pairs:
        src, dst = (a, b) if forward else (b, a)
        pattern = "^" + re.escape(src).replace(r"\{i\}", r"(\d+)").replace(r"\{j\}", r"(\d+)")
        rules.append((pattern + ("" if src.endswith(".") else "$"), dst.replace("{i}", r"\1").replace("{j}", r"\2")))
    return rules


_TIMM_TO_HF = _rules(_CONVNEXT_NAMES, forward=True)
_HF_TO_TIMM = _rules(_CONVNEXT_NAMES, forward=False)
CLIP_PREFIX = "vision_tower.vision_tower.vision_model."  # MGM's CLIPVisionTower > CLIPVisionModel (transformers 4.x)
GLUE = tuple(f"{name}." for name in CONNECTOR_MODULES)  # module prefixes MGM and we share


def _rewrite(key: str, rules) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def timm_convnext_key(timm_key: str) -> str | None:
    """`vision_stages.2.blocks.5.mlp.fc1.weight` -> `encoder.stages.2.layers.5.pwconv1.weight`."""
    return _rewrite(timm_key, _TIMM_TO_HF)


def mgm_key_to_ours(key: str) -> str | None:
    """An MGM checkpoint key -> our state-dict key (None: no counterpart, e.g. CLIP's position_ids)."""
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if not key.startswith("model."):
        return None
    rest = key[len("model."):]
    if rest.startswith(("embed_tokens.", "layers.", "norm.")):
        return "language_model.model." + rest
    if rest.startswith(CLIP_PREFIX):
        # transformers 5's CLIPVisionModel holds the vision transformer itself (no `vision_model.`)
        sub = rest[len(CLIP_PREFIX):]
        return None if sub.endswith("position_ids") else "vision_tower." + sub
    if rest.startswith("vision_tower_aux."):
        sub = timm_convnext_key(rest[len("vision_tower_aux."):])
        return None if sub is None else "vision_tower_aux." + sub
    if rest.startswith(GLUE):
        return rest
    return None


def ours_key_to_mgm(key: str) -> str:
    """Inverse of `mgm_key_to_ours` (used to write MGM-named fixtures and checkpoints)."""
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    if key.startswith("language_model.model."):
        return "model." + key[len("language_model.model."):]
    if key.startswith("vision_tower."):
        return "model." + CLIP_PREFIX + key[len("vision_tower."):]
    if key.startswith("vision_tower_aux."):
        sub = _rewrite(key[len("vision_tower_aux."):], _HF_TO_TIMM)
        if sub is None:
            raise KeyError(f"{key}: no timm counterpart")
        return "model.vision_tower_aux." + sub
    if key.startswith(GLUE):
        return "model." + key
    raise KeyError(f"{key}: not an MGM module")


# -- reading --------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint folder (safetensors or .bin, sharded or not) or a single file."""
    path = Path(path)
    if not path.exists():
        raise fail(f"{path}: no such checkpoint (give a local folder or file; nothing is downloaded)")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin")) \
            or sorted(path.glob("open_clip_pytorch_model.bin")) or sorted(path.glob("mm_projector.bin"))
        if not files:
            raise fail(f"{path}: no *.safetensors, pytorch_model*.bin, open_clip_pytorch_model.bin "
                       "or mm_projector.bin in this folder")
    else:
        files = [path]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            obj = torch.load(str(f), map_location="cpu", weights_only=True)
            state.update(obj.get("state_dict", obj) if isinstance(obj, dict) else obj)
    return state


def _aux_shapes(name: str) -> dict:
    """ConvNeXt trunk sizes from an OpenCLIP model name (as MGM's openclip_encoder decides)."""
    name = name.lower()
    if "xxlarge" in name:
        return {"hidden_sizes": [384, 768, 1536, 3072], "depths": [3, 4, 30, 3]}
    if "base" in name:
        return {"hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3]}
    return {"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3]}  # large (MGM-2B)


def clip_config_from_state(state: dict[str, torch.Tensor], prefix: str = "") -> dict | None:
    """CLIP vision shapes read off its weights (None if absent). Heads are not stored in weights:
    OpenAI CLIPs use 64-dim heads."""
    pos = state.get(prefix + "embeddings.position_embedding.weight")
    patch = state.get(prefix + "embeddings.patch_embedding.weight")
    if pos is None or patch is None:
        return None
    hidden, p = int(patch.shape[0]), int(patch.shape[-1])
    layers = 1 + max(int(k[len(prefix):].split(".")[2]) for k in state if k.startswith(prefix + "encoder.layers."))
    return {"model_type": "clip_vision_model", "hidden_size": hidden, "patch_size": p,
            "image_size": int(round((pos.shape[0] - 1) ** 0.5)) * p, "num_hidden_layers": layers,
            "intermediate_size": int(state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "num_attention_heads": max(1, hidden // 64), "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def convnext_config_from_state(state: dict[str, torch.Tensor], prefix: str = "", image_size: int = 768) -> dict | None:
    """ConvNeXt trunk shapes read off timm-named weights (`vision_stem.*`, `vision_stages.*`; None if absent)."""
    stem = state.get(prefix + "vision_stem.0.weight")
    if stem is None:
        return None
    blocks: dict[int, set[int]] = {}
    for k in state:
        m = re.match(re.escape(prefix) + r"vision_stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(blocks)
    return {"model_type": "convnext", "image_size": image_size, "patch_size": int(stem.shape[-1]),
            "num_stages": len(stages), "depths": [len(blocks[i]) for i in stages],
            "hidden_sizes": [int(state[f"{prefix}vision_stages.{i}.blocks.0.conv_dw.weight"].shape[0]) for i in stages],
            "layer_scale_init_value": 1e-6}


def clip_config_from_folder(name: str, base: Path | None = None) -> dict | None:
    """The CLIP tower's config from the folder `mm_vision_tower` names, as MGM's CLIPVisionTower builds
    the tower from it (a relative name is taken from `base`, the MGM folder). None when no such folder
    is on this disk: the name is then only a name from the machine that trained the checkpoint."""
    path = Path(name)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not name or not (path / "config.json").is_file():
        return None
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig.from_pretrained(str(path)).to_dict()
    # the tower's architecture only: not the folder's own class, dtype or writer
    return {k: v for k, v in config.items() if k not in ("architectures", "dtype", "torch_dtype", "transformers_version")}


def gemma_activation(config: dict) -> str:
    """The activation a Gemma config.json ran with on transformers 4.38 (MGM-2B's): its GemmaMLP read
    `hidden_act` ("gelu": the exact erf GELU) and ignored `hidden_activation`. Transformers 5 rewrites
    "gelu" to the tanh approximation, so the same function goes by a name it leaves alone."""
    act = config.get("hidden_act") or "gelu_pytorch_tanh"
    return presets.EXACT_GELU if act == "gelu" else act


def config_from_mgm(mgm_config: dict | str | Path, state: dict[str, torch.Tensor] | None = None) -> MgmConfig:
    """An MgmConfig from MGM's own config.json (model_type `mgm_gemma`/`mgm_llama`/...).

    The CLIP tower's config comes from the folder `mm_vision_tower` names when it is on this disk
    (absolute, or relative to the MGM folder), as MGM builds it; its head count is in no weight.
    Otherwise the tower paths are opaque names from another machine: tower shapes come from `state`
    (the checkpoint's own weights) when given, else from the tower model names (CLIP ViT-L/14 at
    336 px, OpenCLIP ConvNeXt large/base/xxlarge).
    """
    base = None
    if not isinstance(mgm_config, dict):
        p = Path(mgm_config)
        if not p.is_file():
            raise fail(f"{p}: no MGM config.json here")
        mgm_config, base = json.loads(p.read_text(encoding="utf-8")), p.parent
    c = dict(mgm_config)
    mt = str(c.get("model_type", ""))
    if not mt.startswith("mgm_"):
        raise fail(f"config model_type {mt!r} is not an MGM one (mgm_gemma, mgm_llama, ...)")
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "attention_bias", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
                 "tie_word_embeddings")
    text = {k: c[k] for k in text_keys if c.get(k) is not None}
    text["model_type"] = mt[len("mgm_"):]
    if text["model_type"] == "gemma":
        text["hidden_act"] = gemma_activation(c)
        text.setdefault("tie_word_embeddings", True)
    else:
        text["hidden_act"] = c.get("hidden_act", "silu")
    spec = presets.PRESETS["mgm-2b"]
    vision = dict(spec["vision_config"])
    tower = str(c.get("mm_vision_tower", ""))
    if tower and "336" not in tower:
        vision["image_size"] = 224
    aux_size = int(c.get("image_size_aux", 768))
    aux = dict(spec["vision_aux_config"], image_size=aux_size, **_aux_shapes(str(c.get("mm_vision_tower_aux", ""))))
    if state is not None:
        vision = clip_config_from_state(state, "model." + CLIP_PREFIX) or vision
        aux = convnext_config_from_state(state, "model.vision_tower_aux.", aux_size) or aux
    vision = clip_config_from_folder(tower, base) or vision
    expected_aux = c.get("mm_hidden_size_aux")
    if expected_aux is not None and sum(aux["hidden_sizes"]) != int(expected_aux):
        raise fail(f"mm_hidden_size_aux {expected_aux} does not match ConvNeXt stages {aux['hidden_sizes']}")
    return MgmConfig(
        vision_config=vision, vision_aux_config=aux, text_config=text,
        image_token_id=int(text.get("vocab_size", 256000)), image_size_aux=aux_size,
        mm_vision_select_layer=int(c.get("mm_vision_select_layer", -2)),
        mm_vision_select_feature=str(c.get("mm_vision_select_feature", "patch")),
        mm_projector_type=str(c.get("mm_projector_type", "mlp2x_gelu")),
        # mm_utils.process_images pads only for "pad"; anything else (or none) is resize + centre crop
        image_aspect_ratio="pad" if c.get("image_aspect_ratio") == "pad" else "square")


# -- loading --------------------------------------------------------------------------------
def load_mgm_weights(model: MgmForConditionalGeneration, state: dict[str, torch.Tensor],
                     partial: bool = False) -> dict:
    """Copy MGM-named tensors into `model`. Returns {loaded, missing, unused} key lists.

    A full checkpoint must cover every parameter (else one clear error); `partial=True`
    (a stage-1 mm_projector.bin) only reports what it did not cover.
    """
    ours = model.state_dict()
    mapped, unused = {}, []
    for key, tensor in state.items():
        new = mgm_key_to_ours(key)
        if new is None or new not in ours:
            unused.append(key)
            continue
        if tuple(ours[new].shape) != tuple(tensor.shape):
            raise fail(f"{key}: shape {tuple(tensor.shape)} does not fit {new} {tuple(ours[new].shape)} "
                       "(wrong preset or config for this checkpoint)")
        mapped[new] = tensor
    lm_head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if model.config.tie_word_embeddings and lm_head in mapped and embed in mapped:
        if not torch.equal(mapped[lm_head].float(), mapped[embed].float()):
            raise fail("checkpoint's lm_head differs from embed_tokens but the config ties them: "
                       "set text_config.tie_word_embeddings false")
    missing = sorted(k for k in ours if k not in mapped
                     and not (model.config.tie_word_embeddings and k == lm_head and embed in mapped))
    if missing and not partial:
        raise fail(f"checkpoint misses {len(missing)} weights of the model, e.g. {missing[:3]} "
                   "(a stage-1 mm_projector.bin needs a base LM: use partial=True)")
    model.load_state_dict(mapped, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return {"loaded": sorted(mapped), "missing": missing, "unused": sorted(unused)}


def convert_mgm(folder: str | Path) -> tuple[MgmForConditionalGeneration, dict]:
    """An official MGM folder (config.json + weights) -> (our model, report)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise fail(f"{folder}: no such MGM folder (give a local copy; nothing is downloaded)")
    state = read_state_dict(folder)
    config = config_from_mgm(folder / "config.json", state=state)
    model = build_uninitialised(config)
    report = load_mgm_weights(model, state)
    return model.eval(), report


def build_uninitialised(config: MgmConfig) -> MgmForConditionalGeneration:
    """Allocate the model without running weight init (every weight is about to be overwritten);
    buffers such as rotary frequencies are still computed, unlike on the meta device."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return MgmForConditionalGeneration(config)


def mgm_key_shapes(config: MgmConfig) -> dict[str, list[int]]:
    """The {MGM key: shape} an official checkpoint of this config carries (built on the meta device)."""
    with torch.device("meta"):
        model = MgmForConditionalGeneration(config)
    return {ours_key_to_mgm(k): list(v.shape) for k, v in model.state_dict().items()}
