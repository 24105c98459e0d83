"""Speed levers of the train stage: params.yaml `train:` keys, on CUDA only.

Each lever changes how a step is computed, not what it computes (tests/test_fast.py checks each
against the reference path in float32). On a CPU every lever is off whatever params.yaml says, so
the tiny world's default run keeps its float32 path and its outputs bit for bit (dvc.lock).

- frozen_bf16: frozen weights stored in bf16 (towers always; the LM while frozen; the LoRA base);
  trainable weights stay float32 (their own master copies). An LM frozen in stage 1 and trained in
  stage 2 gets its float32 values back from a host-side stash, not an upcast of the bf16 copy.
- loss_impl: logits only at answer tokens (chunked, or liger-kernel's fused linear cross-entropy).
- liger_kernels: Liger's RMSNorm / GeGLU / RoPE kernels in a Gemma LM (keep fewer activations).
- towers_no_grad, upsample_matmul, fused_mining, mining_matmul: see vlmlab/models/mgm.py `FastPaths`.
- dedup_towers: the collator sends each distinct image once per batch (PadCollator.dedup_images).
- group_images: a sampler that puts the captions of one image in the same batch (off by default:
  it changes the data order, and its effect on the loss is not measured yet).
- fused_adamw, no_host_syncs, cuda_workers, pixels in bf16: the step's plumbing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmlab import io
from vlmlab.models.mgm import LOSS_IMPLS, FastPaths

PARAM_KEYS = ("frozen_bf16", "loss_impl", "liger_kernels", "towers_no_grad", "upsample_matmul", "fused_mining",
              "mining_matmul", "dedup_towers", "group_images", "fused_adamw", "no_host_syncs", "cuda_workers")


@dataclass(frozen=True)
class Levers:
    frozen_bf16: bool = False
    loss_impl: str = "full"
    liger_kernels: bool = False
    towers_no_grad: bool = False
    upsample_matmul: bool = False
    fused_mining: bool = False
    mining_matmul: bool = False
    dedup_towers: bool = False
    group_images: bool = False
    fused_adamw: bool = False
    no_host_syncs: bool = False
    cuda_workers: int = 0

    def __post_init__(self):
        if self.loss_impl not in LOSS_IMPLS:
            raise io.fail(f"train.loss_impl {self.loss_impl!r}: use one of {', '.join(LOSS_IMPLS)} (params.yaml)")

    @classmethod
    def from_params(cls, train: dict) -> "Levers":
        return cls(**{k: train[k] for k in PARAM_KEYS})

    def on(self, cuda: bool) -> "Levers":
        """The levers in effect: as set on a CUDA host, all off elsewhere (the reference float32 path)."""
        return self if cuda else Levers()

    @property
    def any(self) -> bool:
        return self != Levers()


# ---------------------------------------------------------------- the model

def mgm_of(model: nn.Module) -> nn.Module:
    """The MgmForConditionalGeneration under a peft wrapper (or the model itself). By the class: a
    PeftModel forwards unknown attribute reads to the model it wraps, and `fast` must be set on that one."""
    inner = model.get_base_model() if hasattr(type(model), "get_base_model") else model
    if "fast" not in vars(inner):
        raise io.fail(f"{type(model).__name__}: no MGM model inside (expected MgmForConditionalGeneration)")
    return inner


def set_fast_paths(model: nn.Module, levers: Levers) -> None:
    mgm = mgm_of(model)
    if levers.towers_no_grad and any(p.requires_grad for m in (mgm.vision_tower, mgm.vision_tower_aux)
                                     for p in m.parameters()):
        raise io.fail("train.towers_no_grad: a vision tower is trainable in this stage; set towers_no_grad: false")
    mgm.fast = FastPaths(towers_no_grad=levers.towers_no_grad, upsample_matmul=levers.upsample_matmul,
                         fused_mining=levers.fused_mining, mining_matmul=levers.mining_matmul,
                         loss=levers.loss_impl)


def split_precision(model: nn.Module, stash: dict | None, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Frozen floating-point parameters -> `dtype`; trainable ones -> float32.

    A parameter cast down keeps its float32 values in `stash` (host memory, by parameter object), and
    gets them back when it becomes trainable: stage 2 `full` trains the LM from the base's own values.
    Returns the parameter counts by dtype after the split."""
    counts = {"bf16": 0, "fp32": 0}
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        if p.requires_grad:
            if p.dtype != torch.float32:
                kept = stash.pop(id(p), None) if stash is not None else None
                p.data = kept.to(p.device) if kept is not None else p.data.float()
            counts["fp32"] += p.numel()
        else:
            if p.dtype == torch.float32:
                if stash is not None and id(p) not in stash:  # no stash: nothing frozen now trains later
                    stash[id(p)] = p.data if p.device.type == "cpu" else p.data.to("cpu", copy=True)
                p.data = p.data.to(dtype)
            counts["bf16" if p.dtype == dtype else "fp32"] += p.numel()
    return counts


def lora_inputs_as_is(model: nn.Module) -> int:
    """peft casts each LoRA layer's input to its adapter's float32 before dropout; under bf16 autocast
    the adapter's matmul runs in bf16 anyway, so the cast only adds a float32 copy (and a float32
    dropout) of every target layer's input. Returns the number of LoRA layers changed."""
    n = 0
    for m in model.modules():
        if hasattr(m, "cast_input_dtype_enabled") and hasattr(m, "lora_A"):
            m.cast_input_dtype_enabled = False
            n += 1
    return n


def apply_liger(model: nn.Module) -> str:
    """Liger's RMSNorm / GeGLU / RoPE in the LM (not its loss: ours sees only answer tokens).
    '' when applied, else why not (not importable, not a Gemma)."""
    lm = mgm_of(model).language_model
    if lm.config.model_type != "gemma":
        return f"liger kernels: not applied to a {lm.config.model_type} LM (Gemma only)"
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_gemma
    except ImportError as e:
        return f"liger kernels: liger_kernel not importable ({e})"
    apply_liger_kernel_to_gemma(rope=True, rms_norm=True, geglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=lm)
    return ""


def cast_pixels(dataset, dtype: torch.dtype = torch.bfloat16) -> None:
    """The dataset's stored pixels -> `dtype` (bf16 towers read bf16 anyway: the same values, half the
    bytes to collate, pin and copy). Records sharing an image keep sharing one tensor."""
    done: dict[int, torch.Tensor] = {}
    for s in dataset.samples:
        for k in ("pixel_values", "pixel_values_aux"):
            t = s.get(k)
            if t is not None and t.is_floating_point():
                s[k] = done.setdefault(id(t), t.to(dtype))


# ---------------------------------------------------------------- batches of one image's captions

class ImageGroupedSampler(torch.utils.data.Sampler):
    """Rows that share an image come together (in shuffled groups, rows shuffled within), so a batch
    holds all captions of its images and the towers see each image once. Ordered by (seed, epoch) only,
    so a resumed run sees the batches of the run it continues."""

    def __init__(self, image_keys: list, seed: int):
        groups: dict = {}
        for i, key in enumerate(image_keys):
            groups.setdefault(key, []).append(i)
        self.groups, self.n, self.seed, self.epoch = list(groups.values()), len(image_keys), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        for gi in torch.randperm(len(self.groups), generator=g).tolist():
            rows = self.groups[gi]
            yield from (rows[j] for j in torch.randperm(len(rows), generator=g).tolist())


def image_keys(dataset) -> list[int]:
    """One key per row: rows of one image share its pixel tensor (ConversationDataset encodes each image once)."""
    first: dict[int, int] = {}
    return [first.setdefault(id(s["pixel_values"]), i) for i, s in enumerate(dataset.samples)]
