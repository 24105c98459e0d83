"""Training throughput of the MGM recipe vs. a plain transformers + peft LLaVA, on one GPU.

    python bench/train_throughput.py --out bench/out/train_throughput.json            # H200: mgm-2b shapes
    python bench/train_throughput.py --deepspeed configs/deepspeed/zero2.json ...     # + stage 2 via Trainer/ZeRO-2
    python bench/train_throughput.py --preset tiny --steps 2 --out /tmp/tt.json       # CPU smoke test

For each model (our MgmForConditionalGeneration at preset shapes; LlavaForConditionalGeneration
of Gemma-2B + CLIP-L/336 shapes) and each recipe step (stage 1: connector only; stage 2 full:
LM + connector, towers frozen; stage 2 LoRA r128 on the LM + connector as modules_to_save),
it times `--steps` optimizer steps after `--warmup` on a synthetic batch (`--batch` x `--seq`
tokens: <bos>, the image's tokens, then text whose last 64 tokens are the answer), with and
without Liger kernels when `liger_kernel` imports. Reported: samples/s, tokens/s, model
TFLOP/s and MFU (FLOPs counted by torch's FlopCounterMode on the plain run of the same
configuration, so Liger's fused kernels are credited with the same work), peak memory.
Weights fp32 with bf16 autocast on CUDA (what HF Trainer's bf16=True does), fp32 on CPU.

Imports only torch, transformers, peft and vlmlab (deepspeed and liger_kernel optional).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from vlmlab.models.mgm import MgmForConditionalGeneration  # noqa: E402
from vlmlab.models.presets import build_config  # noqa: E402
from vlmlab.train import strategies  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks
LM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ANSWER_TOKENS = 64


# ---------------------------------------------------------------- models

def llava_config(preset: str):
    """LlavaConfig with the shapes of MGM's low-res path: CLIP ViT-L/14-336 + Gemma-2B (or tiny twins)."""
    from transformers import CLIPVisionConfig, GemmaConfig, LlavaConfig

    if preset == "mgm-2b":
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                  num_hidden_layers=24, num_attention_heads=16, projection_dim=768, hidden_act="quick_gelu")
        text = GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                           num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                           hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192)
    else:
        vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3, num_attention_heads=2)
        text = GemmaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    n_image = (vision.image_size // vision.patch_size) ** 2
    # the placeholder must be inside Gemma's vocabulary for LLaVA's embedding lookup
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=text.vocab_size - 1,
                       image_seq_length=n_image, vision_feature_layer=-2, projector_hidden_act="gelu"), n_image


def build(family: str, preset: str, device: str, attn: str):
    """(model, image token id, tokens per image, vocab, low-res side, high-res side or None)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device(device):
        if family == "mgm":
            cfg = build_config(preset, vocab_size=None if preset == "mgm-2b" else 512,
                               image_token_id=None if preset == "mgm-2b" else 511, pad_token_id=0)
            for sub in (cfg.text_config, cfg.vision_config):  # the ConvNeXt has no attention to choose
                sub._attn_implementation = attn
            model = MgmForConditionalGeneration(cfg)
            return model, cfg.image_token_id, cfg.num_image_tokens, cfg.text_config.vocab_size, cfg.image_size, cfg.image_size_aux
        cfg, n_image = llava_config(preset)
        cfg._attn_implementation = cfg.text_config._attn_implementation = cfg.vision_config._attn_implementation = attn
        model = LlavaForConditionalGeneration(cfg)
        return model, cfg.image_token_id, n_image, cfg.text_config.vocab_size, cfg.vision_config.image_size, None


def synthetic_batch(B: int, T: int, image_id: int, n_image: int, vocab: int, side: int, side_aux, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 2, (B, T), generator=g)
    ids[:, 0] = 2
    ids[:, 1:1 + n_image] = image_id                        # (B, T): <bos>, image tokens, text
    if T < 2 + n_image:
        raise SystemExit(f"--seq {T} leaves no text after <bos> + {n_image} image tokens")
    answer = min(ANSWER_TOKENS, T - 1 - n_image)            # never an image position (its id may be out of vocab)
    labels = torch.full((B, T), -100)
    labels[:, -answer:] = ids[:, -answer:]                  # loss on the answer only
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(B, 3, side, side, generator=g)}
    if side_aux:
        batch["pixel_values_aux"] = torch.randn(B, 3, side_aux, side_aux, generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def apply_mode(model, family: str, mode: str, lora_r: int):
    """The recipe's trainable set: stage1 | full | lora (towers always frozen)."""
    if family == "mgm":
        if mode == "stage1":
            return strategies.stage1(model)
        return strategies.stage2(model, mode, strategies.LoraParams(r=lora_r, alpha=2 * lora_r, dropout=0.05))
    connector, lm = "multi_modal_projector", ("language_model", "lm_head")
    keep = (connector,) if mode == "stage1" else (connector, *lm)
    for name, p in model.named_parameters():
        p.requires_grad_(mode != "lora" and any(k in name for k in keep))
    if mode != "lora":
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                            target_modules=rf".*language_model.*\.({'|'.join(LM_LINEARS)})",
                                            modules_to_save=[connector]))


def apply_liger(model, family: str) -> str:
    """Patch Gemma (and LLaVA) with Liger kernels; '' on success, else why not."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_gemma, apply_liger_kernel_to_llava
    except ImportError as e:
        return f"liger_kernel not importable ({e})"
    try:
        if family == "mgm":
            apply_liger_kernel_to_gemma(rope=True, rms_norm=True, geglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=True, model=model.language_model)
        else:
            apply_liger_kernel_to_llava(fused_linear_cross_entropy=True, model=model)
        return ""
    except Exception as e:  # an API drift must not lose the other rows
        return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------- timing

def count_flops(model, batch, device: str) -> float:
    """FLOPs of one forward+backward (matmuls, convs, attention) as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers.integrations import sdpa_attention

    # torch's sdpa FLOP formula asserts equal q/k/v head counts, so the counting pass runs
    # GQA (Gemma-2B: 8 query heads, 1 KV head) with the KV heads repeated: the same matmul work.
    gqa = sdpa_attention.use_gqa_in_sdpa
    sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: False
    try:
        with FlopCounterMode(display=False) as fc, autocast(device):
            loss = model(**batch).loss
            loss.backward()
    finally:
        sdpa_attention.use_gqa_in_sdpa = gqa
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(model, batch, steps: int, warmup: int, device: str) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        with autocast(device):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    B, T = batch["input_ids"].shape
    out = {"step_s": round(dt, 4), "samples_per_s": round(B / dt, 2), "tokens_per_s": round(B * T / dt, 1),
           "loss": round(float(loss), 4), "trainable_params": sum(p.numel() for p in params)}
    if device == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del opt
    return out


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_family(family: str, liger: bool, a, device: str, flops_cache: dict) -> list[dict]:
    rows = []
    model, image_id, n_image, vocab, side, side_aux = build(family, a.preset, device, a.attn)
    note = apply_liger(model, family) if liger else ""
    if note:
        del model
        free(device)
        rows = [{"model": family, "liger": True, "mode": m, "error": note} for m in a.modes]
        for row in rows:
            print(fmt(row), flush=True)
        return rows
    batch = synthetic_batch(a.batch, a.seq, image_id, n_image, vocab, side, side_aux, device)
    for mode in a.modes:  # stage1 -> full -> lora: LoRA wraps the model, so it comes last
        row = {"model": family, "liger": liger, "mode": mode, "batch": a.batch, "seq": a.seq}
        try:
            model = apply_mode(model, family, mode, a.lora_r)
            key = (family, mode)
            if key not in flops_cache:  # Liger's Triton kernels are invisible to the counter: count plain runs
                flops_cache[key] = count_flops(model, batch, device)
            row.update(time_steps(model, batch, a.steps, a.warmup, device))
            tflops = flops_cache[key] / row["step_s"] / 1e12
            row["model_tflops"] = round(tflops, 4)
            row["mfu"] = round(tflops / a.peak_tflops, 4) if a.peak_tflops else None
        except Exception as e:  # one failing configuration (OOM, API drift) must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(fmt(row), flush=True)
        free(device)
    del model, batch
    free(device)
    return rows


# ---------------------------------------------------------------- stage 2 through HF Trainer (+ DeepSpeed)

class SyntheticSet(torch.utils.data.Dataset):
    def __init__(self, batch: dict, n: int):
        self.samples = [{k: v[i % v.shape[0]].cpu() for k, v in batch.items() if k != "attention_mask"} for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def bench_trainer(a, device: str, deepspeed: str, flops_cache: dict) -> dict:
    """Stage 2 full of our recipe through vlmlab.train.recipe.run_stage (HF Trainer), optionally ZeRO-2."""
    from vlmlab.data.collate import PadCollator
    from vlmlab.train import recipe

    row = {"model": "mgm", "liger": False, "mode": "full", "via": "trainer" + ("+" + Path(deepspeed).stem if deepspeed else ""),
           "batch": a.batch, "seq": a.seq}
    if deepspeed:
        try:
            import deepspeed as _  # noqa: F401
        except ImportError as e:
            row["error"] = f"deepspeed not importable ({e})"
            print(fmt(row), flush=True)
            return row
        # a single process without a launcher: give torch.distributed its environment
        for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(k, v)
    try:
        model, image_id, n_image, vocab, side, side_aux = build("mgm", a.preset, device, a.attn)
        batch = synthetic_batch(a.batch, a.seq, image_id, n_image, vocab, side, side_aux, "cpu")
        data = SyntheticSet(batch, a.batch * (a.warmup + a.steps))
        stage = recipe.StageConfig(epochs=1.0, lr=1e-5, global_batch=a.batch, micro_batch=a.batch, warmup_ratio=0.03,
                                   scheduler="cosine")
        cfg = recipe.TrainConfig(stage1=stage, stage2=stage, strategy="full", lora=None, gradient_checkpointing=False,
                                 attn_implementation=a.attn, deepspeed=deepspeed, save_steps=0, workers=0,
                                 group_by_length=False, max_length=0, seed=0)
        model = strategies.stage2(model, "full")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            trainer, fig, _ = recipe.run_stage(model, data, PadCollator(0, 0), cfg.stage2, cfg, Path(tmp) / "out",
                                               stage=2)
        row.update(samples_per_s=fig["samples_per_s"], tokens_per_s=fig["tokens_per_s"], steps=fig["steps"],
                   loss=round(fig["final_loss"], 4))
        if ("mgm", "full") in flops_cache:  # same model, batch and trainable set as the loop's row
            tflops = flops_cache["mgm", "full"] * fig["samples_per_s"] / a.batch / 1e12
            row["model_tflops"] = round(tflops, 2)
            row["mfu"] = round(tflops / a.peak_tflops, 4) if a.peak_tflops else None
        if device == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del trainer, model
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    free(device)
    print(fmt(row), flush=True)
    return row


# ---------------------------------------------------------------- report

def fmt(row: dict) -> str:
    name = f"{row['model']:<5} {'liger' if row['liger'] else 'plain':<5} {row['mode']:<6} {row.get('via', 'loop'):<16}"
    if "error" in row:
        return f"{name} ERROR {row['error']}"
    mfu = f"{row['mfu'] * 100:5.1f}%" if row.get("mfu") is not None else "    -"
    mem = f"{row['peak_mem_gib']:7.1f}" if "peak_mem_gib" in row else "      -"
    tflops = f"{row['model_tflops']:8.2f}" if "model_tflops" in row else "       -"
    return f"{name} {row['samples_per_s']:9.2f} {row['tokens_per_s']:11.0f} {tflops} {mfu} {mem}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mgm-2b", choices=["mgm-2b", "tiny"])
    ap.add_argument("--batch", type=int, default=None, help="samples per step (mgm-2b: 16, tiny: 4)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sample incl. image tokens (mgm-2b: 640, tiny: 96)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU: 3, CPU: 1)")
    ap.add_argument("--lora_r", type=int, default=None, help="LoRA rank (mgm-2b: 128, tiny: 8)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    ap.add_argument("--modes", default="stage1,full,lora")
    ap.add_argument("--families", default="mgm,llava")
    ap.add_argument("--liger", default="auto", choices=["auto", "on", "off"], help="auto: also with Liger if it imports")
    ap.add_argument("--deepspeed", default="", help="also stage 2 full via HF Trainer with this DeepSpeed config")
    ap.add_argument("--trainer", action="store_true", help="also stage 2 full via HF Trainer without DeepSpeed")
    ap.add_argument("--peak_tflops", type=float, default=None, help="for MFU; default from the GPU name")
    ap.add_argument("--out", default="bench/out/train_throughput.json")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    big = a.preset == "mgm-2b"
    a.batch = a.batch or (16 if big else 4)
    a.seq = a.seq or (640 if big else 96)
    a.lora_r = a.lora_r or (128 if big else 8)
    a.warmup = a.warmup if a.warmup is not None else (3 if device == "cuda" else 1)
    a.modes = a.modes.split(",")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    if a.peak_tflops is None and device == "cuda":
        a.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    if device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        import liger_kernel  # noqa: F401
        has_liger = True
    except ImportError:
        has_liger = False
    ligers = [False] + ([True] if a.liger == "on" or (a.liger == "auto" and has_liger and device == "cuda") else [])
    print(f"device {gpu}, preset {a.preset}, batch {a.batch} x {a.seq} tokens, {a.attn}, LoRA r{a.lora_r}, "
          f"{a.steps} timed steps after {a.warmup}; liger: {'yes' if has_liger else 'not installed'}")
    print(f"{'model':<5} {'kern':<5} {'mode':<6} {'via':<16} {'samples/s':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>7}")
    torch.manual_seed(0)
    rows, flops = [], {}
    for liger in ligers:
        for family in a.families.split(","):
            rows += bench_family(family, liger, a, device, flops)
    if a.trainer or a.deepspeed:
        rows.append(bench_trainer(a, device, "", flops))
    if a.deepspeed:
        rows.append(bench_trainer(a, device, a.deepspeed, flops))
    result = {"device": gpu, "preset": a.preset, "batch": a.batch, "seq": a.seq, "attn": a.attn, "lora_r": a.lora_r,
              "steps": a.steps, "warmup": a.warmup, "peak_tflops": a.peak_tflops,
              "torch": torch.__version__, "transformers": __import__("transformers").__version__, "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
