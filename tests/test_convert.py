"""Official MGM checkpoints (their own key names) -> our model, with zero missing keys."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlmlab.io import StageError
from vlmlab.models import MgmForConditionalGeneration, convert, presets
from vlmlab.sim.lm_tokenizer import train_world_tokenizer

KEYS = Path(__file__).parent / "data" / "mgm2b_keys.json"

# Read by hand off MGM's modules (mgm_arch.py, clip_encoder.py, openclip_encoder.py -> timm
# convnext_large, projector builder, MGMGemmaForCausalLM): names and shapes MGM-2B must carry.
ANCHORS = {
    "lm_head.weight": [256000, 2048],
    "model.embed_tokens.weight": [256000, 2048],
    "model.layers.17.self_attn.k_proj.weight": [256, 2048],   # 1 KV head x 256
    "model.layers.0.mlp.down_proj.weight": [2048, 16384],
    "model.norm.weight": [2048],
    "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight": [577, 1024],
    "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight": [1024, 3, 14, 14],
    "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight": [1024],
    "model.vision_tower.vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight": [4096, 1024],
    "model.vision_tower.vision_tower.vision_model.post_layernorm.bias": [1024],
    "model.vision_tower_aux.vision_stem.0.weight": [192, 3, 4, 4],
    "model.vision_tower_aux.vision_stem.1.bias": [192],
    "model.vision_tower_aux.vision_stages.1.downsample.1.weight": [384, 192, 2, 2],
    "model.vision_tower_aux.vision_stages.2.blocks.26.gamma": [768],
    "model.vision_tower_aux.vision_stages.3.blocks.2.conv_dw.weight": [1536, 1, 7, 7],
    "model.vision_tower_aux.vision_stages.3.blocks.2.mlp.fc1.weight": [6144, 1536],
    "model.mm_projector.0.weight": [2048, 1024],
    "model.mm_projector.2.weight": [2048, 2048],
    "model.vlm_uni_query_projector.1.weight": [1024, 1024],
    "model.vlm_uni_aux_projector.1.weight": [1024, 2880],
    "model.vlm_uni_val_projector.0.weight": [2880],
}


def test_fixture_matches_mgm_code_and_our_mapping():
    fixture = json.loads(KEYS.read_text())
    for key, shape in ANCHORS.items():
        assert fixture[key] == shape, key
    # Gemma 165 (incl. lm_head) + CLIP 391 (+ position_ids) + ConvNeXt-L 4+12+36*9 + glue 16
    assert len(fixture) == 165 + 392 + 340 + 16
    regenerated = convert.mgm_key_shapes(presets.build_config("mgm-2b"))
    assert {k: v for k, v in fixture.items() if not k.endswith("position_ids")} == regenerated


def test_mgm_2b_keys_cover_our_model_with_zero_missing():
    fixture = json.loads(KEYS.read_text())
    with torch.device("meta"):
        model = MgmForConditionalGeneration(presets.build_config("mgm-2b"))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    mapped = {convert.mgm_key_to_ours(k): shape for k, shape in fixture.items()}
    unused = [k for k in fixture if convert.mgm_key_to_ours(k) is None]
    assert unused == ["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"]
    mapped.pop(None)
    assert set(ours) - set(mapped) == set()       # zero missing
    assert set(mapped) - set(ours) == set()       # nothing lands nowhere
    assert all(mapped[k] == ours[k] for k in ours)


def test_config_reader_accepts_the_real_mgm_2b_config(fixtures_dir):
    cfg = convert.config_from_mgm(fixtures_dir / "better_synth" / "mgm_2b_pretrain_config.json")
    ref = presets.build_config("mgm-2b")
    assert cfg.mm_hidden_size_aux == 2880 and cfg.image_size == 336 and cfg.image_size_aux == 768
    assert cfg.text_config.to_dict()["num_key_value_heads"] == 1
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "head_dim", "vocab_size"):
        assert getattr(cfg.text_config, key) == getattr(ref.text_config, key), key


def _tiny_mgm_folder(tmp_path, with_extra=True):
    """A tiny model saved as MGM saves itself: MGM key names, MGM config.json."""
    torch.manual_seed(0)
    model, processor = presets.build("tiny", train_world_tokenizer(["a red circle ."]))
    state = {convert.ours_key_to_mgm(k): v.contiguous().clone() for k, v in model.state_dict().items()}
    if with_extra:
        state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    folder = tmp_path / "mgm"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    return model, processor, folder, state


def test_converter_loads_mgm_named_weights_exactly(tmp_path):
    model, processor, folder, state = _tiny_mgm_folder(tmp_path)
    target = MgmForConditionalGeneration(model.config)
    report = convert.load_mgm_weights(target, convert.read_state_dict(folder))
    assert report["missing"] == []
    assert report["unused"] == ["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k


def test_converter_reports_partial_and_refuses_incomplete(tmp_path):
    model, _, folder, state = _tiny_mgm_folder(tmp_path, with_extra=False)
    stage1 = {k: v for k, v in state.items() if not k.startswith(("model.layers", "model.embed", "model.norm", "lm_head"))}
    torch.save(stage1, tmp_path / "mm_projector.bin")
    target = MgmForConditionalGeneration(model.config)
    report = convert.load_mgm_weights(target, convert.read_state_dict(tmp_path / "mm_projector.bin"), partial=True)
    assert report["missing"] and all(k.startswith("language_model.") for k in report["missing"])
    assert torch.equal(target.mm_projector[0].weight, model.mm_projector[0].weight)
    with pytest.raises(StageError, match="misses"):
        convert.load_mgm_weights(MgmForConditionalGeneration(model.config), stage1)
    with pytest.raises(StageError, match="no such checkpoint"):
        convert.read_state_dict(tmp_path / "absent")


class _TimmConvNeXtBlock(torch.nn.Module):
    """timm's ConvNeXtBlock as OpenCLIP's convnext_large uses it (conv_mlp=False, layer scale), timm's names."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = torch.nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = torch.nn.Module()
        self.mlp.fc1, self.mlp.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)
        self.gamma = torch.nn.Parameter(torch.randn(dim))

    def forward(self, x):  # (N, C, H, W)
        y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))  # channels-last LayerNorm
        y = self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(y)))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


def test_timm_convnext_names_compute_the_same_as_ours():
    # the renaming is only valid if both modules compute the same thing: a timm block's weights, loaded
    # through the key mapping into our ConvNeXt (transformers' ConvNextModel, tiny preset), give its output
    from transformers import AutoModel

    torch.manual_seed(0)
    ours = AutoModel.from_config(presets.build_config("tiny").vision_aux_config).eval()
    i, j = 1, 0
    dim = ours.config.hidden_sizes[i]
    timm_block = _TimmConvNeXtBlock(dim).eval()
    for p in timm_block.parameters():  # no default (ones/zeros) init a wrong mapping could hide behind
        torch.nn.init.normal_(p, std=0.2)
    mapped = {convert.timm_convnext_key(f"vision_stages.{i}.blocks.{j}.{k}"): v for k, v in timm_block.state_dict().items()}
    result = ours.load_state_dict(mapped, strict=False)
    assert len(mapped) == 9 and result.unexpected_keys == [] and not set(mapped) & set(result.missing_keys)
    x = torch.randn(2, dim, 6, 6)
    with torch.no_grad():
        assert torch.allclose(ours.encoder.stages[i].layers[j](x), timm_block(x), atol=1e-5)
    assert convert.timm_convnext_key("vision_stages.0.blocks.1.mlp.fc2.bias") == "encoder.stages.0.layers.1.pwconv2.bias"
    assert convert.timm_convnext_key("vision_stages.2.downsample.0.weight") == "encoder.stages.2.downsampling_layer.0.weight"
    assert convert.timm_convnext_key("head.fc.weight") is None


def test_convert_mgm_folder_reads_shapes_off_the_weights(tmp_path):
    model, processor, folder, state = _tiny_mgm_folder(tmp_path)
    text = model.config.text_config
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mgm_llama", "architectures": ["MGMLlamaForCausalLM"], "hidden_act": "silu",
        **{k: getattr(text, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                          "rms_norm_eps", "tie_word_embeddings")},
        "mm_vision_tower": "/elsewhere/openai/clip-tiny", "mm_vision_tower_aux": "/elsewhere/openclip-convnext-tiny",
        "image_size_aux": 96, "mm_hidden_size_aux": model.config.mm_hidden_size_aux,
        "mm_vision_select_layer": -2, "mm_projector_type": "mlp2x_gelu"}))
    converted, report = convert.convert_mgm(folder)
    assert report["missing"] == [] and len(report["unused"]) == 1
    assert converted.config.vision_aux_config.hidden_sizes == model.config.vision_aux_config.hidden_sizes
    assert converted.config.num_image_tokens == model.config.num_image_tokens
    for k, v in model.state_dict().items():
        assert torch.equal(v, converted.state_dict()[k]), k
    with pytest.raises(StageError, match="no such MGM folder"):
        convert.convert_mgm(tmp_path / "absent")


def _same_saved_folder(a, b, tmp_path) -> dict[str, bool]:
    """{file: bytes equal} of two (model, processor) pairs saved with save_pretrained."""
    out = {}
    for name, (model, processor) in (("a", a), ("b", b)):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    for f in sorted((tmp_path / "a").iterdir()):
        out[f.name] = (tmp_path / "b" / f.name).is_file() and f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    return out


def test_the_sims_official_mgm_folder_converts_back_to_the_same_bytes(tmp_path, fixtures_dir):
    """What `zoo` does on every default run: the tiny MGM written in MGM's checkpoint layout
    (sim.mgm_checkpoint), then converted as zoo.local_mgm converts MGM-2B, saves the very folder
    the model and its processor save directly."""
    import copy

    from vlmlab.models import local
    from vlmlab.sim.mgm_checkpoint import CLIP_FOLDER, MGM_FOLDER, OPENCLIP_FOLDER, write_official_mgm

    lm_tokenizer = train_world_tokenizer(["a red circle .", "what does the sign say ?"])
    torch.manual_seed(0)
    model, processor = presets.build("tiny", copy.deepcopy(lm_tokenizer))
    folder = write_official_mgm(model, lm_tokenizer, tmp_path / "ckpt")
    assert folder == (tmp_path / "ckpt" / MGM_FOLDER).resolve()
    config = json.loads((folder / "config.json").read_text())
    real = json.loads((fixtures_dir / "better_synth" / "mgm_2b_pretrain_config.json").read_text())
    assert set(config) == set(real) - {"_name_or_path"}   # MGM-2B's keys, no more, no fewer
    assert config["model_type"] == "mgm_gemma" and config["hidden_act"] == "gelu"
    assert config["mm_vision_tower"] == str(tmp_path.resolve() / "ckpt" / CLIP_FOLDER)
    assert config["mm_hidden_size_aux"] == sum(model.config.vision_aux_config.hidden_sizes)
    keys = set(convert.read_state_dict(folder))
    assert all(k.startswith("model.") for k in keys) and "model.mm_projector.0.weight" in keys
    assert "<image>" not in json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    trunk = convert.read_state_dict(tmp_path / "ckpt" / OPENCLIP_FOLDER)   # OpenCLIP's names, as local_vision_aux reads
    assert all(k.startswith(("visual.trunk.stem.", "visual.trunk.stages.")) for k in trunk)

    converted, conv_processor, metrics = local.build_local({"local_mgm": str(folder)}, "sdpa")
    assert metrics["converted"] == {"mgm": {"loaded": len(keys), "missing": 0, "unused": 0}}
    assert converted.config.vision_config.num_attention_heads == 2   # from the tower folder: no weight holds it
    same = _same_saved_folder((model, processor), (converted, conv_processor), tmp_path / "saved")
    assert all(same.values()) and "model.safetensors" in same, same


def test_tower_config_comes_from_the_folder_mgm_names_when_it_is_here(tmp_path):
    """As MGM's CLIPVisionTower: the CLIP config from mm_vision_tower (absolute, or relative to the MGM
    folder); a name from another machine falls back to shapes read off the weights (64-dim heads)."""
    from transformers import CLIPVisionConfig

    CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                     image_size=32, patch_size=8).save_pretrained(tmp_path / "mgm" / "towers" / "clip")
    assert convert.clip_config_from_folder("towers/clip", tmp_path / "mgm")["num_attention_heads"] == 2
    assert convert.clip_config_from_folder(str(tmp_path / "mgm/towers/clip"))["num_attention_heads"] == 2
    assert "architectures" not in convert.clip_config_from_folder("towers/clip", tmp_path / "mgm")
    assert convert.clip_config_from_folder("/elsewhere/openai/clip-vit-large-patch14-336", tmp_path) is None
    assert convert.clip_config_from_folder("", tmp_path) is None
