"""Fidelity to MGM-2B: a converted official-layout checkpoint computes what the official code computes.

The reference in this file is written from the official code's semantics, apart from vlmlab's
model code (dvlab-research/MGM at transformers 4.38.0, fp32, eval mode):
  - images: mm_utils.expand2square with the CLIP mean colour, CLIPImageProcessor (4.x, PIL) at
    image_size_aux, the low-res view by F.interpolate(bilinear, align_corners=False) of that
    normalised tensor (train.py LazySupervisedDataset, eval/model_vqa_loader.py);
  - text: conversation.py conv_gemma, mm_utils.tokenizer_image_token (one -200 per image),
    train.py preprocess_multimodal + preprocess_gemma (the label masking loop);
  - model: CLIPVisionModel layer -2 patch tokens, the OpenCLIP/timm ConvNeXt trunk with every
    stage bilinearly upsampled to stage 0 and concatenated (openclip_encoder.backbone),
    mgm_arch.unified_resampler, the mlp2x_gelu projector, and transformers 4.38.0's GemmaModel:
    all inputs_embeds times sqrt(hidden), (1 + w) RMSNorm, rotary, multi-query attention,
    exact-GELU GeGLU (hidden_act "gelu"), tied head.
The checkpoint is a tiny random MGM-Gemma saved as MGM saves itself (MGM key names, MGM
config.json, the tokenizer), converted through zoo.source=local (local.build_local -> convert).
tests/official_reference.py runs the real MGM code on transformers 4.38.0 on the same folder.
"""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

from vlmlab.models import MgmForConditionalGeneration, convert, local, presets
from vlmlab.sim.lm_tokenizer import train_world_tokenizer

MGM_IMAGE = -200   # mgm/constants.py IMAGE_TOKEN_INDEX
IGNORE = -100
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXTS = ["a small red circle on the left .", "what does the sign say ?", "the sign says hello .",
         "how many shapes are there ? two", "a large blue square in the middle ."]
CLIP_PREFIX = "model.vision_tower.vision_tower."
AUX = "model.vision_tower_aux."


# -- the official-layout checkpoint -----------------------------------------------------------
def make_official_mgm(folder, seed: int = 0, spread: float = 0.15) -> dict:
    """A tiny random MGM-Gemma as MGM saves it: model.safetensors (+ index) with MGM's key names,
    MGM's config.json (model_type mgm_gemma, hidden_act gelu, image_aspect_ratio pad) and the
    tokenizer (Gemma's layout, no <image>). Returns the config dict."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_world_tokenizer(TEXTS)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    spec = presets.PRESETS["tiny"]
    # OpenAI CLIPs have 64-dim heads, and a converter can only read shapes off the weights
    model, _ = presets.build("tiny", copy.deepcopy(tokenizer),
                             vision_config=dict(spec["vision_config"], num_attention_heads=1))
    with torch.no_grad():  # random init is near-uniform: spread every weight so each computation shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * spread)
    state = {convert.ours_key_to_mgm(k): v.contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model.safetensors" for k in state}}))
    text, vis, aux = model.config.text_config, model.config.vision_config, model.config.vision_aux_config
    config = {
        "architectures": ["MGMGemmaForCausalLM"], "model_type": "mgm_gemma", "transformers_version": "4.38.0",
        "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "head_dim": text.head_dim, "hidden_act": "gelu",
        "max_position_embeddings": text.max_position_embeddings, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "attention_bias": False, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "float32",
        "image_aspect_ratio": "pad", "image_grid": 1, "image_global": False, "image_size_aux": aux.image_size,
        "mm_hidden_size": vis.hidden_size, "mm_hidden_size_aux": sum(aux.hidden_sizes),
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tokenizer_padding_side": "right",
        "mm_vision_tower": "/elsewhere/openai/clip-vit-tiny-patch8-32",
        "mm_vision_tower_aux": "/elsewhere/openclip-convnext-tiny",
        # what the reference needs to rebuild the towers (MGM takes them from the tower folders)
        "reference_clip": {"hidden_size": vis.hidden_size, "intermediate_size": vis.intermediate_size,
                           "num_hidden_layers": vis.num_hidden_layers, "num_attention_heads": 1,
                           "patch_size": vis.patch_size, "image_size": vis.image_size},
        "reference_convnext": {"depths": list(aux.depths), "dims": list(aux.hidden_sizes), "patch_size": aux.patch_size},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return config


# -- the reference, from the official code's semantics ----------------------------------------
def ref_expand2square(img: Image.Image, background) -> Image.Image:
    width, height = img.size
    if width == height:
        return img
    if width > height:
        result = Image.new(img.mode, (width, width), background)
        result.paste(img, (0, (width - height) // 2))
        return result
    result = Image.new(img.mode, (height, height), background)
    result.paste(img, ((height - width) // 2, 0))
    return result


def ref_clip_preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """CLIPImageProcessor.preprocess (transformers 4.38, PIL path) with shortest_edge = crop = size."""
    arr = np.asarray(img.convert("RGB"))
    h, w = arr.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    out_h, out_w = (new_long, new_short) if w <= h else (new_short, new_long)
    arr = np.asarray(Image.fromarray(arr).resize((out_w, out_h), resample=Image.BICUBIC, reducing_gap=None))
    top, left = (out_h - size) // 2, (out_w - size) // 2
    arr = arr[top:top + size, left:left + size]
    arr = (arr * 0.00392156862745098).astype(np.float32)              # rescale: float64 product, float32
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def ref_views(img: Image.Image, low: int, high: int, aspect: str = "pad") -> tuple[torch.Tensor, torch.Tensor]:
    """(low-res view, high-res view) as MGM's eval/model_vqa_loader.py makes them."""
    if aspect == "pad":
        img = ref_expand2square(img.convert("RGB"), tuple(int(x * 255) for x in CLIP_MEAN))
    aux = ref_clip_preprocess(img, high)
    return F.interpolate(aux[None], size=[low, low], mode="bilinear", align_corners=False)[0], aux


def ref_tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = [chunks[0][0]] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(MGM_IMAGE)
        ids.extend(chunk[offset:])
    return ids


def ref_gemma_prompt(turns: list[tuple[str, str | None]]) -> str:
    """conv_gemma.get_prompt(): roles user/model, sep "" after the user, "<eos>" after the model."""
    out = ""
    for i, (role, message) in enumerate(turns):
        if message:
            out += "<start_of_turn>" + role + "\n" + message + "<end_of_turn>\n" + ("", "<eos>")[i % 2]
        else:
            out += "<start_of_turn>" + role + "\n"
    return out


def ref_preprocess_gemma(conversations: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """train.py preprocess_multimodal + preprocess_gemma(has_image=True) for one sample."""
    turns = []
    for sentence in conversations:
        value = sentence["value"]
        if "<image>" in value:
            value = ("<image>" + "\n" + value.replace("<image>", "").strip()).strip()
        turns.append(({"human": "user", "gpt": "model"}[sentence["from"]], value))
    conversation = ref_gemma_prompt(turns)
    input_ids = ref_tokenizer_image_token(conversation, tokenizer)
    target = list(input_ids)
    sep = "<start_of_turn>" + "" + "model" + "\n"
    cur_len = 1
    target[:cur_len] = [IGNORE] * cur_len
    for rou in conversation.split("<eos>"):
        if rou == "":
            break
        parts = rou.split(sep)
        assert len(parts) == 2
        parts[0] += sep
        round_len = len(ref_tokenizer_image_token(rou, tokenizer))
        instruction_len = len(ref_tokenizer_image_token(parts[0], tokenizer)) - 1
        target[cur_len:cur_len + instruction_len] = [IGNORE] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE] * (len(target) - cur_len)
    assert cur_len == len(input_ids), "tokenization mismatch: MGM would mask the whole sample"
    return input_ids, target


def expand_image(ids: list[int], labels: list[int] | None, image_id: int, n: int):
    """MGM splices n image features where the -200 stands, labelled IGNORE."""
    out_ids, out_labels = [], []
    for i, t in enumerate(ids):
        out_ids += [image_id] * n if t == MGM_IMAGE else [t]
        if labels is not None:
            out_labels += [IGNORE] * n if t == MGM_IMAGE else [labels[i]]
    return out_ids, out_labels


def ln2d(x, w, b):  # timm LayerNorm2d: channels-first LayerNorm, eps 1e-6
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, 1e-6).permute(0, 3, 1, 2)


def ref_convnext(sd: dict, x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """OpenCLIP's timm ConvNeXt trunk (stem + stages, head dropped), every stage upsampled to
    stage 0's grid in float32 and concatenated (openclip_encoder.OpenCLIPVisionTower.backbone)."""
    x = F.conv2d(x, sd[AUX + "vision_stem.0.weight"], sd[AUX + "vision_stem.0.bias"], stride=cfg["patch_size"])
    x = ln2d(x, sd[AUX + "vision_stem.1.weight"], sd[AUX + "vision_stem.1.bias"])
    stages = []
    for i, depth in enumerate(cfg["depths"]):
        s = f"{AUX}vision_stages.{i}."
        if i:
            x = ln2d(x, sd[s + "downsample.0.weight"], sd[s + "downsample.0.bias"])
            x = F.conv2d(x, sd[s + "downsample.1.weight"], sd[s + "downsample.1.bias"], stride=2)
        for j in range(depth):
            b = f"{s}blocks.{j}."
            y = F.conv2d(x, sd[b + "conv_dw.weight"], sd[b + "conv_dw.bias"], padding=3, groups=x.shape[1])
            y = F.layer_norm(y.permute(0, 2, 3, 1), (x.shape[1],), sd[b + "norm.weight"], sd[b + "norm.bias"], 1e-6)
            y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
            x = x + (y * sd[b + "gamma"]).permute(0, 3, 1, 2)
        stages.append(x)
    grid = stages[0].shape[-2:]
    return torch.cat([stages[0]] + [F.interpolate(m.float(), size=grid, mode="bilinear", align_corners=False)
                                    for m in stages[1:]], dim=1)


def ref_clip(sd: dict, cfg: dict, pixels: torch.Tensor) -> torch.Tensor:
    """CLIPVisionTower: hidden_states[-2] without CLS (MGM calls transformers' CLIPVisionModel)."""
    model = CLIPVisionModel(CLIPVisionConfig(**cfg, hidden_act="quick_gelu", layer_norm_eps=1e-5)).eval()
    ours = model.state_dict()
    tensors = {}
    for key, value in sd.items():
        if key.startswith(CLIP_PREFIX) and not key.endswith("position_ids"):
            rest = key[len(CLIP_PREFIX):]
            tensors[rest if rest in ours else rest[len("vision_model."):]] = value
    model.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        return model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


def ref_seq(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:  # nn.Sequential(LayerNorm, Linear)
    p = f"model.{name}."
    x = F.layer_norm(x, (x.shape[-1],), sd[p + "0.weight"], sd[p + "0.bias"], 1e-5)
    return F.linear(x, sd[p + "1.weight"], sd[p + "1.bias"])


def ref_image_features(sd: dict, cfg: dict, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """mgm_arch.encode_images: tokens + unified_resampler(tokens, aux), then the projector."""
    images = ref_clip(sd, cfg["reference_clip"], low)                          # (B, N, C)
    aux = ref_convnext(sd, high, cfg["reference_convnext"])                   # (B, C_aux, G, G)
    patch_num = int(images.shape[1] ** 0.5)
    patch_size = aux.shape[-1] // patch_num
    aux = aux.permute(0, 2, 3, 1)
    aux = aux.reshape(len(aux), patch_num, patch_size, patch_num, patch_size, aux.shape[-1])
    aux = aux.permute(0, 1, 3, 2, 4, 5).reshape(len(aux), patch_num ** 2, patch_size ** 2, aux.shape[-1])
    q = ref_seq(sd, "vlm_uni_query_projector", images)
    k = ref_seq(sd, "vlm_uni_aux_projector", aux)
    v = ref_seq(sd, "vlm_uni_val_projector", aux)
    att = (q[:, :, None] @ (k.transpose(-1, -2) / (k.shape[-1] ** 0.5))).nan_to_num()
    feats = images + (att.softmax(-1) @ v).mean(2)
    x = F.linear(feats, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])
    return F.linear(F.gelu(x), sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"])


def ref_gemma_logits(sd: dict, cfg: dict, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """transformers 4.38.0 GemmaForCausalLM.forward(inputs_embeds=...) in fp32, eager attention."""
    B, T, D = inputs_embeds.shape
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]

    def norm(x, w):  # GemmaRMSNorm: x / rms(x) * (1 + w)
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * (1 + w)

    def rotate_half(x):
        return torch.cat((-x[..., hd // 2:], x[..., :hd // 2]), dim=-1)

    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = torch.arange(T).float()[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()                                            # (T, hd)
    causal = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)
    h = inputs_embeds * (cfg["hidden_size"] ** 0.5)                           # GemmaModel: the normalizer
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = norm(h, sd[p + "input_layernorm.weight"])
        q = F.linear(x, sd[p + "self_attn.q_proj.weight"]).view(B, T, nh, hd).transpose(1, 2)
        k = F.linear(x, sd[p + "self_attn.k_proj.weight"]).view(B, T, nkv, hd).transpose(1, 2)
        v = F.linear(x, sd[p + "self_attn.v_proj.weight"]).view(B, T, nkv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(2, 3)) / math.sqrt(hd) + causal
        att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
        h = h + F.linear((att @ v).transpose(1, 2).reshape(B, T, nh * hd), sd[p + "self_attn.o_proj.weight"])
        x = norm(h, sd[p + "post_attention_layernorm.weight"])
        gate = F.gelu(F.linear(x, sd[p + "mlp.gate_proj.weight"]))            # hidden_act "gelu": erf GELU
        h = h + F.linear(gate * F.linear(x, sd[p + "mlp.up_proj.weight"]), sd[p + "mlp.down_proj.weight"])
    return F.linear(norm(h, sd["model.norm.weight"]), sd["lm_head.weight"])


def ref_logits(sd, cfg, ids: list[int], low, high) -> torch.Tensor:
    """prepare_inputs_labels_for_multimodal (image features where the -200 stands) + the LM."""
    at = ids.index(MGM_IMAGE)
    embed = sd["model.embed_tokens.weight"]
    feats = ref_image_features(sd, cfg, low[None], high[None])[0]
    inputs = torch.cat([embed[ids[:at]], feats, embed[ids[at + 1:]]])[None]
    return ref_gemma_logits(sd, cfg, inputs)[0]


# -- tests ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mgm") / "MGM-tiny"
    cfg = make_official_mgm(folder)
    model, processor, _ = local.build_local({"local_mgm": str(folder)}, "eager")
    return folder, cfg, load_file(str(folder / "model.safetensors")), model.eval(), processor


def test_converted_config_is_mgm_2b_s_computation(official):
    _, cfg, _, model, processor = official
    text = model.config.text_config
    assert text.model_type == "gemma" and text.hidden_act == "gelu_python"  # "gelu" ran as erf GELU on 4.38
    x = torch.linspace(-4, 4, 101)
    act = model.language_model.model.layers[0].mlp.act_fn
    assert torch.allclose(act(x), F.gelu(x), atol=1e-6)                      # not the tanh approximation
    assert model.config.image_aspect_ratio == processor.image_aspect_ratio == "pad"
    assert processor.image_token_id == model.config.image_token_id == cfg["vocab_size"]  # outside the vocabulary


def test_image_token_embeddings_are_sqrt_hidden_times_projector_output(official):
    _, cfg, sd, model, processor = official
    image = Image.fromarray((np.random.default_rng(1).random((200, 300, 3)) * 255).astype(np.uint8))
    batch = processor.pad([processor.encode_prompt("what does the sign say ?", image)])
    seen = {}

    def grab(module, args, kwargs):  # the hidden states the first decoder layer receives
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    hook = model.language_model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        hook.remove()
    slots = batch["input_ids"][0] == processor.image_token_id
    lm_inputs = seen["h"][0, slots]                                            # (N, D) what the LM reads
    low, high = ref_views(image, model.config.image_size, model.config.image_size_aux)
    reference = ref_image_features(sd, cfg, low[None], high[None])[0]
    scale = cfg["hidden_size"] ** 0.5
    assert torch.allclose(lm_inputs, scale * out.image_hidden_states[0], atol=1e-5)
    assert torch.allclose(lm_inputs, scale * reference, atol=1e-4), (lm_inputs - scale * reference).abs().max()
    # text tokens: the embedding row times the same scale
    text_at = (~slots).nonzero()[1, 0]
    token = batch["input_ids"][0, text_at]
    assert torch.allclose(seen["h"][0, text_at], scale * sd["model.embed_tokens.weight"][token], atol=1e-5)


def test_llama_lm_reads_image_features_unscaled():
    # the scale is Gemma's (transformers 4.38 GemmaModel); a Llama MGM splices the projector output as is
    config = presets.build_config("tiny", vocab_size=32, image_token_id=32,
                                  text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                               "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32})
    model = MgmForConditionalGeneration(config).eval()
    ids = torch.tensor([[2, 32, 32, 5]])
    feats = torch.randn(1, 2, 64)
    embeds = model.embed_inputs(ids, feats)
    assert torch.equal(embeds[0, 1:3], feats[0])
    assert torch.equal(embeds[0, 0], model.get_input_embeddings().weight[2])


def test_views_of_a_300x200_image_are_mgm_pad_then_downsample(official):
    _, _, _, model, processor = official
    rng = np.random.default_rng(2)
    for size in ((300, 200), (200, 300)):
        image = Image.fromarray((rng.random(size[::-1] + (3,)) * 255).astype(np.uint8))
        views = processor.images(image)
        low, high = ref_views(image, model.config.image_size, model.config.image_size_aux)
        assert torch.equal(views["pixel_values_aux"], high)
        assert torch.equal(views["pixel_values"], low)
    # "square" (MGM: anything but pad) is CLIPImageProcessor's resize + centre crop, same low-res derivation
    crop = type(processor)(processor.tokenizer, processor.image_size, processor.image_size_aux,
                           processor.num_image_tokens, image_aspect_ratio="square")
    low, high = ref_views(image, processor.image_size, processor.image_size_aux, aspect="square")
    views = crop.images(image)
    assert torch.equal(views["pixel_values_aux"], high) and torch.equal(views["pixel_values"], low)


def test_two_round_labels_equal_preprocess_gemma(official):
    _, _, _, _, processor = official
    tokenizer = AutoTokenizer.from_pretrained(official[0])  # the checkpoint's own, as MGM loads it
    conv = [{"from": "human", "value": "what does the sign say ?\n<image>"}, {"from": "gpt", "value": "hello ."},
            {"from": "human", "value": "how many shapes are there ?"}, {"from": "gpt", "value": "two"}]
    ids, labels = ref_preprocess_gemma(conv, tokenizer)
    ids, labels = expand_image(ids, labels, processor.image_token_id, processor.num_image_tokens)
    enc = processor.encode_conversation(conv, Image.new("RGB", (96, 96)))
    assert enc["input_ids"].tolist() == ids
    assert enc["labels"].tolist() == labels
    learned = tokenizer.convert_ids_to_tokens([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert learned == ["hello", ".", "<end_of_turn>", "\n", "<eos>", "two", "<end_of_turn>", "\n", "<eos>"]


def test_prompt_ids_equal_model_vqa_loader(official):
    _, _, _, _, processor = official
    tokenizer = AutoTokenizer.from_pretrained(official[0])
    prompt = ref_gemma_prompt([("user", "<image>\n" + "what does the sign say ?"), ("model", None)])
    ids, _ = expand_image(ref_tokenizer_image_token(prompt, tokenizer), None, processor.image_token_id,
                          processor.num_image_tokens)
    assert processor.prompt_ids("what does the sign say ?", with_image=True).tolist() == ids


def test_converted_checkpoint_logits_and_greedy_tokens_equal_the_official_computation(official):
    _, cfg, sd, model, processor = official
    tokenizer = AutoTokenizer.from_pretrained(official[0])
    image = Image.fromarray((np.random.default_rng(3).random((200, 300, 3)) * 255).astype(np.uint8))
    question = "what does the sign say ?"
    low, high = ref_views(image, model.config.image_size, model.config.image_size_aux)
    ids = ref_tokenizer_image_token(ref_gemma_prompt([("user", "<image>\n" + question), ("model", None)]), tokenizer)
    batch = processor.pad([processor.encode_prompt(question, image)])
    with torch.no_grad():
        ours = model(**batch).logits[0]
        reference = ref_logits(sd, cfg, ids, low, high)
    assert ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff:.2e} (logit scale {reference.abs().max():.2f})"
    # greedy decoding, 6 tokens: the official loop recomputes the whole sequence each step
    steps, ref_new = 6, []
    with torch.no_grad():
        for _ in range(steps):
            ref_new.append(int(ref_logits(sd, cfg, ids + ref_new, low, high)[-1].argmax()))
        out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    assert out[0, batch["input_ids"].shape[1]:].tolist() == ref_new
