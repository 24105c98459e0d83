"""Named model shapes: `tiny` (the embedded world, fast on a 2-core CPU) and `mgm-2b`.

`mgm-2b` reproduces MGM-2B exactly: Gemma-2B (dvlab's config.json), CLIP ViT-L/14 at 336 px,
OpenCLIP ConvNeXt-L (timm `convnext_large`) at 768 px, so mm_hidden_size_aux = 192+384+768+1536 = 2880.
`tiny` has the same architecture at toy sizes: its LM is a Gemma too (sqrt(hidden) input
scale, (1 + w) RMSNorm, GeGLU, one KV head), so the real path's code runs in every default run.

Both LMs use `hidden_act: gelu_python`, the exact (erf) GELU: MGM-2B's config says "gelu", which
transformers 4.38 ran as exact GELU, but transformers 5's GemmaConfig rewrites "gelu" to the
tanh approximation; "gelu_python" is the same erf formula under a name it leaves alone.
"""
from __future__ import annotations

import copy

from vlmlab.models.mgm import MgmConfig

EXACT_GELU = "gelu_python"  # erf GELU, a name transformers 5's GemmaConfig does not rewrite to tanh
PRESETS: dict[str, dict] = {
    "tiny": {
        # 32 px / patch 8 -> 4x4 = 16 image tokens; the sign word is illegible at 32 px
        "vision_config": {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8,
                          "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "projection_dim": 64},
        # 96 px / stem 8 -> 12x12 stage-0 grid, 6x6, 3x3: each low-res token mines its 3x3 patch
        "vision_aux_config": {"model_type": "convnext", "image_size": 96, "patch_size": 8,
                              "num_stages": 3, "hidden_sizes": [24, 48, 96], "depths": [1, 1, 1]},
        # a small Gemma (multi-query like Gemma-2B); vocab_size comes from the world tokenizer
        "text_config": {"model_type": "gemma", "hidden_size": 128, "intermediate_size": 256,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                        "head_dim": 32, "hidden_act": EXACT_GELU, "max_position_embeddings": 256,
                        "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
        "image_size_aux": 96,
        "image_aspect_ratio": "pad",
    },
    "mgm-2b": {
        "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14,
                          "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "projection_dim": 768, "hidden_act": "quick_gelu",
                          "layer_norm_eps": 1e-5},
        "vision_aux_config": {"model_type": "convnext", "image_size": 768, "patch_size": 4,
                              "num_stages": 4, "hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3],
                              "layer_scale_init_value": 1e-6},
        # google/gemma-2b-it as in MGM-2B's config.json
        "text_config": {"model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048,
                        "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8,
                        "num_key_value_heads": 1, "head_dim": 256, "hidden_act": EXACT_GELU,
                        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "tie_word_embeddings": True},
        "image_size_aux": 768,
        "image_aspect_ratio": "pad",  # MGM-2B (fine-tuned) pads; the challenge's stage-1 config says "square"
        "image_token_id": 256000,  # `<image>` appended to Gemma's 256000-token vocabulary
    },
}


def build_config(name: str, vocab_size: int | None = None, image_token_id: int | None = None,
                 pad_token_id: int | None = None, bos_token_id: int | None = None, eos_token_id=None,
                 attn_implementation: str | None = None, **overrides) -> MgmConfig:
    """MgmConfig for preset `name`; token ids come from the tokenizer the model will use."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    spec = copy.deepcopy(PRESETS[name])
    text = spec["text_config"]
    for key, value in (("vocab_size", vocab_size), ("pad_token_id", pad_token_id),
                       ("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        if value is not None:
            text[key] = value
    if image_token_id is not None:
        spec["image_token_id"] = image_token_id
    spec.update(overrides)
    config = MgmConfig(**spec)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def lm_vocab_size(processor) -> int:
    """The LM's vocabulary: the tokenizer's, less an `<image>` appended last, which stays outside
    it as it does for Gemma (MGM-2B: 256000 rows, `<image>` = 256000)."""
    n = len(processor.tokenizer)
    return n - 1 if processor.image_token_id == n - 1 else n


def build(name: str, tokenizer, attn_implementation: str | None = None, **overrides):
    """A randomly initialised model of preset `name` and its processor, token ids from `tokenizer`.

    Returns (MgmForConditionalGeneration, MgmProcessor)."""
    from vlmlab.models.mgm import MgmForConditionalGeneration
    from vlmlab.models.processor import MgmProcessor

    spec = PRESETS[name] if name in PRESETS else {}
    vision, aux = spec.get("vision_config", {}), spec.get("vision_aux_config", {})
    n_tokens = (vision.get("image_size", 336) // vision.get("patch_size", 14)) ** 2
    processor = MgmProcessor(tokenizer, vision.get("image_size", 336), spec.get("image_size_aux", 768), n_tokens,
                             image_aspect_ratio=overrides.get("image_aspect_ratio", spec.get("image_aspect_ratio", "pad")))
    vocab = lm_vocab_size(processor) if name == "tiny" else None
    config = build_config(name, vocab_size=vocab, image_token_id=processor.image_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=processor.stop_token_ids, attn_implementation=attn_implementation,
                          **overrides)
    assert config.num_image_tokens == processor.num_image_tokens and config.aux_grid, config
    return MgmForConditionalGeneration(config), processor
