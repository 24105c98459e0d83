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

import contextlib
import functools
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
from torch.utils.checkpoint import checkpoint


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


def aten_gelu(model: nn.Module) -> nn.Module:
    """`gelu_python` activations (presets.EXACT_GELU) computed by F.gelu: the same exact GELU (what transformers
    4.38's "gelu" ran for MGM-2B), through ATen's own kernel. The python formula's torch.erf and its backward's
    torch.exp go through MKL's VML on a CPU, whose bits follow the CPU's vendor and ISA (vlmlab/determinism.py)."""
    from transformers.activations import GELUActivation

    for m in model.modules():
        if isinstance(m, GELUActivation) and getattr(m.act, "__func__", None) is GELUActivation._gelu_python:
            m.act = F.gelu
    return model


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


# ---------------------------------------------------------------- training fast paths
# Each computes what the reference path computes (tests/test_fast.py checks it in float32); none is
# in the config, so a saved model is the same whichever ran. vlmlab/train/fast.py turns them on for
# CUDA runs only: on CPU the reference path keeps every output bit for bit.

@dataclass
class FastPaths:
    towers_no_grad: bool = False    # towers (frozen in every stage) under torch.no_grad: no autograd bookkeeping
    upsample_matmul: bool = False   # ConvNeXt maps upsampled as two small matmuls (bilinear = separable)
    fused_mining: bool = False      # mining keys + values: one LayerNorm of the aux map, one GEMM
    mining_matmul: bool = False     # mining on a channels-last map in MGM's explicit matmuls (implies fused_mining)
    loss: str = "full"              # full: HF's loss on all logits | chunked | liger: logits at answer tokens only


LOSS_IMPLS = ("full", "chunked", "liger")
CE_CHUNK_ELEMENTS = 2**28  # logits alive at once in the chunked loss (1 GiB fp32): ~1k tokens of Gemma's 256k vocabulary


@functools.lru_cache(maxsize=32)
def bilinear_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n_out, n_in): 1-D bilinear interpolation as F.interpolate(align_corners=False) computes it.

    Built on `device` (no host-to-device copy, which would wait for the stream) and cached. For the
    power-of-two scales of a ConvNeXt the weights are k/2^j, exact in bf16."""
    scale = n_in / n_out
    src = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    lam = src - i0
    rows = torch.arange(n_out, device=device)
    m = torch.zeros(n_out, n_in, device=device, dtype=torch.float64)
    m.index_put_((rows, i0), 1 - lam, accumulate=True)
    m.index_put_((rows, i1), lam, accumulate=True)
    return m.to(dtype)


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W), F.interpolate(mode="bilinear", align_corners=False) as two matmuls
    (measured on an H200: 3.9 vs 28.0 ms for 32 ConvNeXt-L maps)."""
    wy = bilinear_matrix(x.shape[-2], size[0], x.dtype, x.device)   # (H, h)
    wx = bilinear_matrix(x.shape[-1], size[1], x.dtype, x.device)   # (W, w)
    return wy @ (x @ wx.T)                                           # (B, C, h, W) -> (B, C, H, W)


def upsample_bilinear_cl(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """upsample_bilinear's result channels last: (B, C, h, w) -> (B, H, W, C), contiguous."""
    B, C, h, w = x.shape
    wy = bilinear_matrix(h, size[0], x.dtype, x.device)              # (H, h)
    wx = bilinear_matrix(w, size[1], x.dtype, x.device)              # (W, w)
    t = torch.matmul(wx, x.permute(0, 2, 3, 1))                       # (B, h, W, C)
    return torch.matmul(wy, t.reshape(B, h, -1)).view(B, size[0], size[1], C)  # (B, H, W, C)


def _running(module: nn.Module) -> nn.Module:
    """The module that runs when `module` is called: a peft ModulesToSaveWrapper (LoRA runs train the
    connector through one) runs its active trained copy, or its original when adapters are off."""
    copies = getattr(module, "modules_to_save", None)
    if copies is None:
        return module
    active = module.active_adapters
    if module.disable_adapters or not active or active[0] not in copies:
        return module.original_module
    return copies[active[0]]


def _ce_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ weight.T).float(), y, reduction="sum")  # (M, V) logits, upcast as HF's loss does


def answer_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch=None, impl: str = "chunked") -> torch.Tensor:
    """HF's causal-LM loss (labels shifted by one, -100 ignored; sum / num_items_in_batch if given, else
    mean) with logits only where a label exists. hidden (B, T, D) after the final norm, weight (V, D).

    `chunked`: the head's logits in chunks of CE_CHUNK_ELEMENTS, each recomputed in backward (a chunk's
    logits are never kept); `liger`: liger-kernel's fused linear cross-entropy."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])                 # (B*(T-1), D)
    y = labels[:, 1:].reshape(-1).to(hidden.device)                   # (B*(T-1),)
    keep = y != -100
    h, y = h[keep], y[keep]                                           # (M, D), (M,)
    if torch.is_autocast_enabled(h.device.type):  # cast the head once, not once per chunk
        dt = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dt), weight.to(dt)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        total = liger_fused_linear_cross_entropy(h, weight, y, reduction="sum")
    elif impl == "chunked":
        rows = max(1, CE_CHUNK_ELEMENTS // weight.shape[0])
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], rows):
            total = total + checkpoint(_ce_sum, h[s:s + rows], weight, y[s:s + rows], use_reentrant=False)
    else:
        raise ValueError(f"answer_cross_entropy impl {impl!r}: use 'chunked' or 'liger'")
    return total / (num_items_in_batch if num_items_in_batch is not None else h.shape[0])


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
        self.language_model = aten_gelu(AutoModelForCausalLM.from_config(config.text_config))
        self.fast = FastPaths()  # all off: the reference path (vlmlab/train/fast.py sets them for CUDA training)
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
        if self.fast.mining_matmul:  # channels-last memory behind the (B, C_aux, G, G) view: what the mining reads
            cl = [maps[0].permute(0, 2, 3, 1)] + [upsample_bilinear_cl(m, tuple(grid)) for m in maps[1:]]
            return torch.cat(cl, dim=-1).permute(0, 3, 1, 2)
        if self.fast.upsample_matmul:
            return torch.cat([maps[0]] + [upsample_bilinear(m, tuple(grid)) for m in maps[1:]], dim=1)
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
        if self.fast.mining_matmul:
            return self._mine_matmul(tokens, aux, n, p)
        # (the fused path keeps a bf16 map bf16: under autocast the ViT's tokens come out float32)
        aux = (aux if self.fast.fused_mining else aux.to(tokens.dtype)).permute(0, 2, 3, 1)  # (B, G, G, C_aux)
        aux = aux.reshape(B, n, p, n, p, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, N, p * p, -1)  # (B, N, p*p, C_aux)
        q = self.vlm_uni_query_projector(tokens)[:, :, None]   # (B, N, 1, C)
        if self.fast.fused_mining:
            k, v = self._mining_keys_values(aux, q.dtype)
        else:
            k = self.vlm_uni_aux_projector(aux)                # (B, N, p*p, C)
            v = self.vlm_uni_val_projector(aux)                # (B, N, p*p, C)
        # softmax(q k^T / sqrt(C)) v, one query per token; SDPA is MGM's explicit matmul, fused
        return F.scaled_dot_product_attention(q, k, v).squeeze(2)  # (B, N, C)

    def _mine_matmul(self, tokens: torch.Tensor, aux: torch.Tensor, n: int, p: int) -> torch.Tensor:
        """mine_patches in MGM's explicit matmuls on a channels-last map, never rearranged into patches:
        with the map viewed as (B, a, i, m, j, C) (patch row a, row i in it, patch column m, column j),
        token (a, m)'s keys in row i are p consecutive positions, so one batched matmul over strided
        views scores them all. (SDPA's kernel for this head size took 26 ms of an H200 step's backward.)"""
        B, N, C = tokens.shape
        q = self.vlm_uni_query_projector(tokens)                                   # (B, N, C)
        k, v = self._mining_keys_values(aux.permute(0, 2, 3, 1), q.dtype)          # 2 x (B, G, G, C)
        k = k.unflatten(1, (n, p)).unflatten(3, (n, p))                            # (B, a, i, m, j, C)
        v = v.unflatten(1, (n, p)).unflatten(3, (n, p))                            # (B, a, i, m, j, C)
        s = torch.matmul(k, q.view(B, n, 1, n, C, 1)).squeeze(-1) * C ** -0.5      # (B, a, i, m, j)
        w = s.permute(0, 1, 3, 2, 4).reshape(B, n, n, p * p).softmax(-1)           # (B, a, m, i*j)
        w = w.view(B, n, n, p, p).permute(0, 1, 3, 2, 4).to(v.dtype)               # (B, a, i, m, j)
        out = torch.matmul(w.unsqueeze(-2), v).squeeze(-2).sum(2)                  # (B, a, m, C)
        return out.reshape(B, N, C)

    def _mining_keys_values(self, aux: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Both mining projectors (LayerNorm then Linear) over one normalisation of the aux map:
        LN(x) W^T + c = x_hat (W g)^T + (W b + c), so keys and values are one GEMM on x_hat.
        aux (..., C_aux) -> k, v (..., C). The map is frozen (no grad), so x_hat is too: autograd keeps
        one bf16 x_hat for the weight gradients instead of two float32 LayerNorm outputs and their casts."""
        (ln_k, lin_k), (ln_v, lin_v) = _running(self.vlm_uni_aux_projector), _running(self.vlm_uni_val_projector)
        if ln_k.eps != ln_v.eps:
            raise ValueError(f"fused mining needs one LayerNorm eps for keys and values ({ln_k.eps} vs {ln_v.eps})")
        weight = torch.cat([lin_k.weight * ln_k.weight, lin_v.weight * ln_v.weight])                   # (2C, C_aux)
        bias = torch.cat([F.linear(ln_k.bias, lin_k.weight, lin_k.bias), F.linear(ln_v.bias, lin_v.weight, lin_v.bias)])
        with torch.autocast(aux.device.type, enabled=False):  # autocast would write the normalised map in float32
            x_hat = F.layer_norm(aux, aux.shape[-1:], eps=ln_k.eps)                                    # (..., C_aux)
        k, v = F.linear(x_hat, weight, bias).chunk(2, dim=-1)                                          # 2 x (..., C)
        return k.to(dtype), v.to(dtype)

    def get_image_features(self, pixel_values: torch.Tensor, pixel_values_aux: torch.Tensor | None = None,
                           image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Both views -> (B, N, D_lm) image tokens for the LM. With `image_index` (B,), the pixels are
        the batch's distinct images (U of them) and row b reads image image_index[b]."""
        frozen = torch.no_grad() if self.fast.towers_no_grad else contextlib.nullcontext()
        with frozen:
            tokens = self.encode_low_res(pixel_values)                  # (U, N, C_vis)
            aux = self.encode_high_res(pixel_values_aux) if pixel_values_aux is not None else None
        if aux is not None:
            tokens = tokens + self.mine_patches(tokens, aux)
        feats = self.mm_projector(tokens)                               # (U, N, D_lm)
        return feats if image_index is None else feats[image_index.to(feats.device)]  # (B, N, D_lm)

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
        image_index: torch.LongTensor | None = None,        # (B,): row -> its image among the pixels (deduplicated batch)
        **kwargs,
    ) -> MgmCausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        image_features = None
        if inputs_embeds is None:
            if pixel_values is not None:
                image_features = self.get_image_features(pixel_values, pixel_values_aux, image_index)  # (B_img, N, D)
            elif past_key_values is None or past_key_values.get_seq_length() == 0:  # prefill: images expected
                n_slots = int((input_ids == self.config.image_token_id).sum())
                if n_slots:
                    raise ValueError(f"{n_slots} <image> tokens in input_ids but no pixel_values given")
            inputs_embeds = self.embed_inputs(input_ids, image_features)
        head = self.language_model.get_output_embeddings()
        if (labels is not None and self.training and self.fast.loss != "full" and past_key_values is None
                and head.bias is None and not getattr(self.language_model.config, "final_logit_softcapping", None)):
            # training: the loss from the final hidden states at answer tokens; no (B, T, V) logits
            num_items = kwargs.pop("num_items_in_batch", None)
            hidden = self.language_model.model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, **kwargs).last_hidden_state                                  # (B, T, D)
            loss = answer_cross_entropy(hidden, head.weight, labels, num_items, self.fast.loss)
            return MgmCausalLMOutputWithPast(loss=loss, image_hidden_states=image_features)
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
