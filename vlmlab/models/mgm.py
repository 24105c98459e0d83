"""Mini-Gemini (MGM) as a Hugging Face model: one model, one file.

MGM (dvlab-research/MGM, mgm/model/mgm_arch.py) reads an image twice:
  - a CLIP ViT sees the low-res view; its patch tokens from layer -2 (no CLS) are the
    image tokens the LM will read (N = (image_size / patch)^2 of them);
  - a ConvNeXt sees the high-res view; the outputs of all its stages, upsampled to the
    first stage's grid and concatenated on channels, form a dense feature map;
  - patch info mining: every low-res token is a query attending to the high-res
    features that lie inside its own patch (query/key/value projectors
    `vlm_uni_query_projector` / `vlm_uni_aux_projector` / `vlm_uni_val_projector`);
    the mined vector is added to the token;
  - an `mlp2x_gelu` projector maps the tokens to the LM width, and they replace the
    `<image>` placeholder tokens of the prompt (one placeholder per image token);
  - a causal LM built from its own config (Gemma for MGM-2B, a tiny Gemma for the tiny world).
    MGM-2B ran on transformers 4.38, whose GemmaModel multiplied *all* input embeddings by
    sqrt(hidden_size), spliced image features included; transformers 5 scales inside the
    token embedding module instead, so `embed_inputs` applies 4.38's scale to the whole input (docs/fidelity.md).

Submodule names follow MGM's so that checkpoints map one-to-one (see convert.py).

Example (runnable)::

    >>> from vlmlab.models import presets
    >>> config = presets.build_config("tiny", vocab_size=64, image_token_id=64)
    >>> model = MgmForConditionalGeneration(config)
    >>> model.config.num_image_tokens
    16
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ModelOutput


# MGM's `image_aspect_ratio`: "pad" pads to a square (mm_utils.expand2square), anything else is
# CLIPImageProcessor's resize + centre crop; "square" and "crop" name the latter here
IMAGE_ASPECT_RATIOS = ("pad", "square", "crop")
# the connector MGM's stage 1 trains, by MGM's module names: the MLP projector and the three patch-info-mining projections
CONNECTOR_MODULES = ("mm_projector", "vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector")
# LMs whose MGM checkpoints were trained with every input embedding (image features included)
# multiplied by sqrt(hidden_size): Gemma under transformers 4.38 (GemmaModel.forward's normalizer)
SCALED_INPUT_EMBEDDINGS = ("gemma",)


@strict
class MgmConfig(PreTrainedConfig):
    r"""Configuration of a Mini-Gemini model: three sub-configs plus the glue between them.

    Defaults give the shapes of MGM-2B's towers (CLIP ViT-L/14 at 336 px, ConvNeXt-L at 768 px);
    `presets.py` holds the complete `tiny` and `mgm-2b` configurations.
    """

    model_type = "mgm"
    sub_configs_defaults = {
        # low-res tower: CLIP ViT-L/14-336 (MGM: mm_vision_tower)
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model",
            init_kwargs={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                         "num_attention_heads": 16, "patch_size": 14, "image_size": 336, "projection_dim": 768}),
        # high-res tower: ConvNeXt-L trunk (MGM: mm_vision_tower_aux, OpenCLIP convnext_large_d_320)
        "vision_aux_config": SubConfigSpec(
            config_class=AutoConfig, model_type="convnext",
            init_kwargs={"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3], "image_size": 768}),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="gemma"),
    }
    vision_config: dict | PreTrainedConfig | None = None
    vision_aux_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 256000          # placeholder id; never embedded (masked before the lookup)
    image_size_aux: int = 768             # high-res side fed to the ConvNeXt
    mm_vision_select_layer: int = -2      # CLIP hidden state used (MGM/LLaVA: the penultimate layer)
    mm_vision_select_feature: str = "patch"  # "patch": drop CLS; "cls_patch": keep it
    mm_projector_type: str = "mlp2x_gelu"    # "linear" or "mlp{N}x_gelu", as MGM's projector builder
    image_aspect_ratio: str = "pad"       # "pad": expand2square with the mean colour | "square": resize + centre crop
    initializer_range: float = 0.02       # for the glue modules (projector, mining)
    tie_word_embeddings: bool = False     # follows text_config (see __post_init__)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio {self.image_aspect_ratio!r}: use one of {IMAGE_ASPECT_RATIOS}")

    @property
    def image_size(self) -> int:  # low-res side (MGM: CLIP's 336)
        return int(self.vision_config.image_size)

    @property
    def mm_hidden_size(self) -> int:
        return int(self.vision_config.hidden_size)

    @property
    def mm_hidden_size_aux(self) -> int:  # every ConvNeXt stage is concatenated (MGM-2B: 2880)
        return int(sum(self.vision_aux_config.hidden_sizes))

    @property
    def num_image_tokens(self) -> int:
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side * side + (1 if self.mm_vision_select_feature == "cls_patch" else 0)

    @property
    def aux_grid(self) -> int:  # side of the ConvNeXt's first-stage map (stem stride = patch_size)
        return self.image_size_aux // self.vision_aux_config.patch_size


@dataclass
class MgmCausalLMOutputWithPast(ModelOutput):
    """loss (1,), logits (B, T, V), past_key_values, hidden_states, attentions, and
    image_hidden_states (B, N, D): the projected image tokens (before a Gemma LM's input scaling; prefill only)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None


def build_projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    """MGM's `build_vision_projector`: `linear` or `mlp{N}x_gelu` (Sequential, so keys are `0.`, `2.`, ...)."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind.startswith("mlp") and kind.endswith("x_gelu"):
        depth = int(kind[3:-len("x_gelu")])
        layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
        for _ in range(1, depth):
            layers += [nn.GELU(), nn.Linear(d_out, d_out)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown mm_projector_type {kind!r} (use 'linear' or 'mlp2x_gelu')")


def norm_linear(d_in: int, d_out: int) -> nn.Sequential:
    """The mining projectors are LayerNorm then Linear (keys `.0.` and `.1.` as in MGM)."""
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out))


class MgmPreTrainedModel(PreTrainedModel):
    config: MgmConfig
    base_model_prefix = "model"  # no such attribute: the whole model is the base (as for LLaVA's head model)
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["CLIPEncoderLayer", "ConvNextStage", "LlamaDecoderLayer", "GemmaDecoderLayer"]

    def _init_weights(self, module):
        # towers and LM initialise themselves (their own PreTrainedModel); this covers the glue
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MgmForConditionalGeneration(MgmPreTrainedModel, GenerationMixin):
    def __init__(self, config: MgmConfig):
        super().__init__(config)
        d_vis, d_aux, d_lm = config.mm_hidden_size, config.mm_hidden_size_aux, config.text_config.hidden_size
        self.vision_tower = AutoModel.from_config(config.vision_config)          # CLIPVisionModel
        # a ConvNeXt has no attention: whatever implementation the LM and ViT use, it refuses all but eager
        config.vision_aux_config._attn_implementation = "eager"
        self.vision_tower_aux = AutoModel.from_config(config.vision_aux_config)  # ConvNextModel
        # MGM drops the trunk's head (norm_pre/head = None): we never pool, so no final norm either
        self.vision_tower_aux.layernorm = nn.Identity()
        self.vlm_uni_query_projector = norm_linear(d_vis, d_vis)
        self.vlm_uni_aux_projector = norm_linear(d_aux, d_vis)
        self.vlm_uni_val_projector = norm_linear(d_aux, d_vis)
        self.mm_projector = build_projector(config.mm_projector_type, d_vis, d_lm)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # -- embeddings plumbing (resize, tying, peft) is the LM's --------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    # -- vision ---------------------------------------------------------------------------
    def encode_low_res(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, C_vis): CLIP hidden state at the select layer, CLS dropped."""
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config.mm_vision_select_layer]  # (B, 1+N, C_vis)
        return feats[:, 1:] if self.config.mm_vision_select_feature == "patch" else feats

    def encode_high_res(self, pixel_values_aux: torch.Tensor) -> torch.Tensor:
        """(B, 3, S', S') -> (B, C_aux, G, G): every ConvNeXt stage, upsampled to stage 0's grid G."""
        tower = self.vision_tower_aux
        x = tower.embeddings(pixel_values_aux.to(tower.embeddings.patch_embeddings.weight.dtype))
        maps = []
        for stage in tower.encoder.stages:  # stage i halves the grid (i > 0)
            x = stage(x)
            maps.append(x)
        grid = maps[0].shape[-2:]
        # MGM upsamples in float32 and casts back; PyTorch's bilinear kernels already accumulate
        # bf16/fp16 in float32, so the map's own dtype gives the same values without the float32
        # copies (every element equal: on an H200 for a contiguous map, bench/results/parts_upsample.json;
        # on CPU for channels-last maps as the ConvNeXt returns them)
        maps = [maps[0]] + [F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps[1:]]
        return torch.cat(maps, dim=1)  # (B, C_aux, G, G)

    def mine_patches(self, tokens: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """Patch info mining: each of the n x n low-res tokens attends to the p x p high-res
        features of its own patch (p = G / n). tokens (B, N, C), aux (B, C_aux, G, G) -> (B, N, C)."""
        B, N, C = tokens.shape
        n = int(round(N ** 0.5))
        G = aux.shape[-1]
        if n * n != N or G % n:
            raise ValueError(f"patch mining needs a square token grid dividing the high-res grid: N={N}, grid={G}")
        p = G // n
        aux = aux.to(tokens.dtype).permute(0, 2, 3, 1)                                 # (B, G, G, C_aux)
        aux = aux.reshape(B, n, p, n, p, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, N, p * p, -1)  # (B, N, p*p, C_aux)
        q = self.vlm_uni_query_projector(tokens)[:, :, None]   # (B, N, 1, C)
        k = self.vlm_uni_aux_projector(aux)                    # (B, N, p*p, C)
        v = self.vlm_uni_val_projector(aux)                    # (B, N, p*p, C)
        # softmax(q k^T / sqrt(C)) v, one query per token; SDPA is MGM's explicit matmul, fused
        return F.scaled_dot_product_attention(q, k, v).squeeze(2)  # (B, N, C)

    def get_image_features(self, pixel_values: torch.Tensor, pixel_values_aux: torch.Tensor | None = None) -> torch.Tensor:
        """Both views -> (B, N, D_lm) image tokens for the LM."""
        tokens = self.encode_low_res(pixel_values)                      # (B, N, C_vis)
        if pixel_values_aux is not None:
            tokens = tokens + self.mine_patches(tokens, self.encode_high_res(pixel_values_aux))
        return self.mm_projector(tokens)                                # (B, N, D_lm)

    # -- the whole model --------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) LM input embeddings, image features (B_img, N, D) in the <image>
        slots. The placeholder id may lie outside the LM vocabulary (e.g. Gemma + an added
        <image>), so it is embedded as id 0 (and overwritten where features are given).

        Gemma: MGM-2B ran on transformers 4.38.0, whose GemmaModel multiplied the whole input,
        spliced image features included, by the Python float sqrt(hidden_size). Transformers 5
        scales inside the token embedding module (by the scale cast to the weight dtype), which
        would leave the image features unscaled. So for Gemma the raw embedding rows are looked
        up, the features spliced in, and the sum scaled as 4.38.0 did (in float32 this equals the
        embedding module's own scaling bit for bit; in bf16 it is 4.38.0's rounding)."""
        image_mask = input_ids == self.config.image_token_id                                  # (B, T)
        ids = input_ids.masked_fill(image_mask, 0)
        embedding = self.get_input_embeddings()
        text = self.config.text_config
        scaled = text.model_type in SCALED_INPUT_EMBEDDINGS
        embeds = F.embedding(ids, embedding.weight, embedding.padding_idx) if scaled else embedding(ids)  # (B, T, D)
        if image_features is not None:
            n_slots = int(image_mask.sum())
            if n_slots != image_features.shape[0] * image_features.shape[1]:
                raise ValueError(
                    f"image features and image tokens do not match: {n_slots} <image> tokens in input_ids, "
                    f"{image_features.shape[0]} images x {image_features.shape[1]} features "
                    "(encode prompts with MgmProcessor, which expands <image> to config.num_image_tokens)")
            embeds = embeds.masked_scatter(image_mask[..., None].to(embeds.device), image_features.to(embeds.dtype))
        return embeds * text.hidden_size ** 0.5 if scaled else embeds

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,          # (B, T) with N image placeholders per image
        pixel_values: torch.Tensor | None = None,           # (B, 3, S, S) low-res
        pixel_values_aux: torch.Tensor | None = None,       # (B, 3, S', S') high-res
        attention_mask: torch.Tensor | None = None,         # (B, T_past + T), 1 = real token
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,             # (B, T), -100 outside answers
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MgmCausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        image_features = None
        if inputs_embeds is None:
            if pixel_values is not None:
                image_features = self.get_image_features(pixel_values, pixel_values_aux)  # (B_img, N, D)
            elif past_key_values is None or past_key_values.get_seq_length() == 0:  # prefill: images expected
                n_slots = int((input_ids == self.config.image_token_id).sum())
                if n_slots:
                    raise ValueError(f"{n_slots} <image> tokens in input_ids but no pixel_values given")
            inputs_embeds = self.embed_inputs(input_ids, image_features)
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, labels=labels, use_cache=use_cache,
            logits_to_keep=logits_to_keep, **kwargs)
        return MgmCausalLMOutputWithPast(
            loss=out.loss, logits=out.logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions, image_hidden_states=image_features)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        # images are spliced at prefill only; later steps read them from the KV cache
        # (transformers already drops `pixel_values`; `pixel_values_aux` is ours)
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("pixel_values_aux", None)
            inputs.pop("pixel_values", None)
        return inputs


AutoConfig.register("mgm", MgmConfig, exist_ok=True)
AutoModelForImageTextToText.register(MgmConfig, MgmForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(MgmConfig, MgmForConditionalGeneration, exist_ok=True)
