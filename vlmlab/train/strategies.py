"""Which parameters train in each stage of the MGM recipe.

Keyed on MGM's module names (docs/contracts.md), so the same rules hold for the tiny
world model, the `mgm-2b` preset and a converted official checkpoint:
- stage 1: projector + patch-info-mining modules; everything else frozen;
- stage 2 `full`: language model + projector + mining; both vision towers frozen;
- stage 2 `lora`: peft LoRA on the language model's linear layers, projector + mining
  trained as whole modules through peft's `modules_to_save` (so the adapter folder alone,
  on top of the untouched base, reproduces the trained model).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from vlmlab import io
from vlmlab.models.mgm import CONNECTOR_MODULES

TOWER_MODULES = ("vision_tower", "vision_tower_aux")
LANGUAGE_MODEL = "language_model"
STRATEGIES = ("full", "lora")


@dataclass
class LoraParams:
    r: int = 16                    # adapter rank (MGM/LLaVA LoRA: 128 on 2B+ models)
    alpha: int = 32                # scale = alpha / r; usually 2*r
    dropout: float = 0.05          # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # LM linear layers

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise io.fail(f"LoRA rank r={self.r!r} must be a positive integer (params.yaml runs.<run>.lora_r)")
        if self.alpha <= 0:
            raise io.fail(f"LoRA alpha={self.alpha!r} must be > 0 (params.yaml runs.<run>.lora_alpha)")
        if not 0.0 <= self.dropout < 1.0:
            raise io.fail(f"LoRA dropout={self.dropout!r} must be in [0, 1) (params.yaml runs.<run>.lora_dropout)")
        if not self.target_modules:
            raise io.fail("LoRA target_modules is empty (params.yaml train.lora_targets: e.g. [q_proj, v_proj])")


def check_strategy(strategy: str, where: str = "runs.<run>.strategy") -> str:
    if strategy not in STRATEGIES:
        raise io.fail(f"unknown training strategy {strategy!r} in params.yaml {where}; use one of: {', '.join(STRATEGIES)}")
    return strategy


def _top(name: str) -> str:
    """Top-level submodule of a parameter name, past any peft wrapping."""
    name = re.sub(r"^(base_model\.model\.)", "", name)
    return name.split(".", 1)[0]


def set_trainable(model: nn.Module, modules: tuple[str, ...]) -> nn.Module:
    """requires_grad on exactly the parameters under the named top-level submodules."""
    missing = [m for m in modules if not hasattr(model, m)]
    if missing:
        raise io.fail(f"model {type(model).__name__} has no submodule(s) {missing}: not an MGM model (see docs/contracts.md)")
    for name, p in model.named_parameters():
        p.requires_grad_(_top(name) in modules)
    return model


def stage1(model: nn.Module) -> nn.Module:
    """MGM pretrain: only the connector (projector + mining) learns, on caption data."""
    return set_trainable(model, CONNECTOR_MODULES)


def lora_config(lora: LoraParams):
    from peft import LoraConfig

    # A regex (full match) so that the vision towers' own q/k/v projections stay untouched.
    targets = "|".join(re.escape(t) for t in lora.target_modules)
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
        target_modules=rf".*{LANGUAGE_MODEL}\..*\.({targets})",
        modules_to_save=list(CONNECTOR_MODULES),
    )


def stage2(model: nn.Module, strategy: str, lora: LoraParams | None = None, base_path: str | None = None) -> nn.Module:
    """Instruction tuning: `full` returns the model with towers frozen; `lora` a PeftModel.

    `base_path`: the base folder the adapter names (adapter_config.json base_model_name_or_path).
    """
    check_strategy(strategy)
    if strategy == "full":
        return set_trainable(model, (LANGUAGE_MODEL, *CONNECTOR_MODULES))
    from peft import get_peft_model

    set_trainable(model, ())  # peft then unfreezes the adapters and the modules_to_save copies
    peft_model = get_peft_model(model, lora_config(lora or LoraParams()))
    if base_path is not None:  # set here, the one place: get_peft_model writes the model's own name_or_path
        peft_model.peft_config["default"].base_model_name_or_path = str(base_path)
    return peft_model


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts by kind: lora adapters, each top-level module, and the total."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "lora" if ".lora_" in name else _top(name)
        counts[kind] = counts.get(kind, 0) + p.numel()
    counts["total"] = sum(counts.values())
    return counts
