"""Training throughput of the MGM train stage vs. the peers' recipes on the same shapes, on one GPU.

    python bench/train_throughput.py --out bench/out/train_throughput.json            # H200: mgm-2b shapes
    python bench/train_throughput.py --profile bench/out/train_profile.txt ...        # + where a step's time goes
    python bench/train_throughput.py --preset tiny --steps 2 --out /tmp/tt.json       # CPU smoke test

Rows, each on `--batch` x `--seq` token samples (<bos>, the image's tokens, then text whose last 64
tokens are the answer), recipe steps stage 1 (connector only), stage 2 full (LM + connector, towers
frozen) and stage 2 LoRA r128 (LM adapters + connector as modules_to_save):
- `ours`: the train stage itself (vlmlab.train.recipe.prepare_stage + run_stage, HF Trainer) with
  params.yaml's `train:` levers (the stage's defaults), and `ours-off`: the same with every lever off
  (the stage before them: float32 weights + bf16 autocast, HF loss on all logits). Both start from
  the same weights and see the same batches: their loss curves are recorded side by side.
  `ours-dedup`: stage 1 on a set with 3 captions per image, batches grouped by image
  (train.group_images), towers once per image.
- `class` / `llava`: our MgmForConditionalGeneration and a plain LlavaForConditionalGeneration
  (Gemma-2B + CLIP-L/336 shapes) in a plain loop, all weights bf16 as the peers load them
  (LLaVA/MGM/LLaMA-Factory), then the same with Liger kernels (fused linear CE, RMSNorm, GeGLU, RoPE).
Reported: samples/s, tokens/s, model TFLOP/s and MFU (FLOPs of the plain class / LLaVA configuration
counted by torch's FlopCounterMode, so fused or skipped work is credited as the same work), peak
memory, and each row's ratio to the best peer row of its step. Each group of rows (a row name, plain or
Liger) runs in a process of its own: an out-of-memory row leaves no fragmented allocator to the next
groups, and Liger's global patching of Gemma reaches no plain row. `ours` rows run pinned as the
train stage is (vlmlab.determinism.pin, then relax_cuda unless train.cuda_deterministic); `ours-nopin` unpinned.

Imports only torch, transformers, peft and vlmlab (liger_kernel optional).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
if "--_pin" in sys.argv:  # an `ours` job runs as stages/train.py does: pinned before torch (and numpy) load
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from vlmlab.determinism import pin, relax_cuda
    pin(threads=2)
    from vlmlab.params import load as load_params
    if not load_params(Path(__file__).resolve().parents[1] / "params.yaml")["train"]["cuda_deterministic"]:
        relax_cuda()

import torch  # noqa: E402

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


def synthetic_batch(B: int, T: int, image_id: int, n_image: int, vocab: int, side: int, side_aux, device: str,
                    generator: torch.Generator | None = None) -> dict:
    g = generator if generator is not None else torch.Generator().manual_seed(0)
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
           "loss": round(float(loss.detach()), 4), "trainable_params": sum(p.numel() for p in params)}
    if device == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del opt
    return out


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_family(family: str, liger: bool, a, device: str, flops_cache: dict) -> list[dict]:
    """`class` (our model) or `llava` rows in a plain loop, all weights bf16 (the peers' recipe)."""
    label = "class" if family == "mgm" else "llava"
    rows = []
    torch.manual_seed(0)
    model, image_id, n_image, vocab, side, side_aux = build(family, a.preset, device, a.attn)
    if device == "cuda":
        model.to(torch.bfloat16)
    note = apply_liger(model, family) if liger else ""
    if note:
        del model
        free(device)
        rows = [{"model": label, "liger": True, "mode": m, "error": note} for m in a.modes]
        for row in rows:
            print(fmt(row), flush=True)
        return rows
    batch = synthetic_batch(a.batch, a.seq, image_id, n_image, vocab, side, side_aux, device)
    for mode in a.modes:  # stage1 -> full -> lora: LoRA wraps the model, so it comes last
        row = {"model": label, "liger": liger, "mode": mode, "batch": a.batch, "seq": a.seq, "via": "loop"}
        try:
            model = apply_mode(model, family, mode, a.lora_r)
            key = (family, mode)
            if key not in flops_cache:  # Liger's Triton kernels are invisible to the counter: count plain runs
                flops_cache[key] = count_flops(model, batch, device)
            row.update(time_steps(model, batch, a.steps, a.warmup, device))
        except Exception as e:  # one failing configuration (OOM, API drift) must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(fmt(row), flush=True)
        free(device)
    del model, batch
    free(device)
    return rows


# ---------------------------------------------------------------- the train stage itself

class SyntheticSet(torch.utils.data.Dataset):
    """Samples as ConversationDataset holds them (`samples`, rows of one image sharing its pixel tensors)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


_SAMPLES: dict = {}


def synthetic_samples(n: int, T: int, image_id: int, n_image: int, vocab: int, side: int, side_aux,
                      per_image: int = 1, seed: int = 0) -> list[dict]:
    """`n` distinct samples (`per_image` of them share one image): a step sees other tokens than the last.
    Made once per shape and handed out as fresh dicts (prepare_data replaces a row's pixel tensors)."""
    key = (n, T, image_id, n_image, vocab, side, side_aux, per_image, seed)
    if key not in _SAMPLES:
        _SAMPLES[key] = _make_samples(*key)
    return [dict(s) for s in _SAMPLES[key]]


def _make_samples(n, T, image_id, n_image, vocab, side, side_aux, per_image, seed) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out, px = [], None
    for i in range(n):
        b = synthetic_batch(1, T, image_id, n_image, vocab, side, side_aux, "cpu", generator=g)
        if i % per_image == 0:
            px = {k: b[k][0] for k in ("pixel_values", "pixel_values_aux") if k in b}
        out.append({"input_ids": b["input_ids"][0], "labels": b["labels"][0], **px})
    return out


def ours_config(a, mode: str, levers):
    """A TrainConfig from params.yaml's `train:` (the stage's defaults), batch and step count from the bench."""
    from dataclasses import replace

    from vlmlab.params import load as load_params
    from vlmlab.train import recipe

    train = load_params(Path(__file__).resolve().parents[1] / "params.yaml")["train"]
    train = {**train, "stage1_global_batch": a.batch, "stage1_micro_batch": a.batch, "stage2_global_batch": a.batch,
             "stage2_micro_batch": a.batch, "stage1_epochs": 1, "stage2_epochs": 1, "save_steps": 0,
             "deepspeed": a.deepspeed}
    run = {"data": "raw", "strategy": "lora" if mode == "lora" else "full", "lr": 2e-5,  # MGM-2B stage 2 lr
           "lora_r": a.lora_r, "lora_alpha": 2 * a.lora_r, "lora_dropout": 0.05}
    cfg = recipe.TrainConfig.from_params(train, run, seed=0)
    levers = levers if levers is not None else cfg.levers
    if a.cuda_workers is not None:
        levers = replace(levers, cuda_workers=a.cuda_workers)
    return replace(cfg, levers=levers)


def bench_ours(label: str, mode: str, a, device: str, levers=None, per_image: int = 1, profile: list | None = None) -> dict:
    """One recipe step through the train stage's own code: prepare_stage (trainable set + levers), then
    run_stage (HF Trainer), on `warmup + steps` distinct batches; the per-step losses come back too."""
    from dataclasses import replace

    from vlmlab.train import recipe

    row = {"model": label, "liger": None, "mode": mode, "batch": a.batch, "seq": a.seq, "via": "train stage"}
    try:
        cfg = ours_config(a, mode, levers)
        if per_image > 1:
            cfg = replace(cfg, levers=replace(cfg.levers, group_images=True))
        lv = recipe.levers_in_effect(cfg)
        row["levers"] = {k: v for k, v in vars(lv).items()}
        torch.manual_seed(0)  # the same initial weights in every row of this mode
        model, image_id, n_image, vocab, side, side_aux = build("mgm", a.preset, device, a.attn)
        data = SyntheticSet(synthetic_samples(a.batch * (a.warmup + a.steps), a.seq, image_id, n_image, vocab, side,
                                              side_aux, per_image=per_image))
        recipe.prepare_data(cfg, data)
        model = recipe.prepare_stage(model, 1 if mode == "stage1" else 2, cfg, None)  # one stage: nothing to stash
        sc = cfg.stage1 if mode == "stage1" else cfg.stage2
        free(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            _, fig, curve = recipe.run_stage(model, data, recipe.make_collator(0, cfg), sc, cfg, Path(tmp) / "out",
                                             stage=1 if mode == "stage1" else 2)
        timed = [r for r in curve[a.warmup:] if "step_s" in r] or curve
        step_s = sum(r["step_s"] for r in timed) / len(timed)
        row.update(step_s=round(step_s, 4), samples_per_s=round(a.batch / step_s, 2),
                   tokens_per_s=round(a.batch * a.seq / step_s, 1), stage_metric_samples_per_s=fig["samples_per_s"],
                   loss=round(curve[-1]["loss"], 4), losses=[round(r["loss"], 5) for r in curve],
                   trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
        if device == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if profile is not None:
            try:  # a profiler hiccup must not lose the row
                profile.append(profile_step(model, recipe.make_collator(0, cfg)(data.samples[:a.batch]), device,
                                            f"{label} {mode}"))
            except Exception as e:
                profile.append(f"=== {label} {mode}: profile failed: {type(e).__name__}: {e}")
        del model, data
    except Exception as e:  # one failing configuration (OOM, API drift) must not lose the others
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    free(device)
    print(fmt(row), flush=True)
    return row


def profile_step(model, batch: dict, device: str, title: str) -> str:
    """One forward + backward under torch.profiler: the kernels a step spends its time in."""
    from torch.profiler import ProfilerActivity, profile

    batch = {k: v.to(device) for k, v in batch.items()}
    model.train()
    for _ in range(2):  # the second is profiled (the first warms allocator and kernels)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof, autocast(device):
            model(**batch).loss.backward()
            sync(device)
    model.zero_grad(set_to_none=True)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return f"=== {title}\n" + prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=80)


# ---------------------------------------------------------------- report

def fmt(row: dict) -> str:
    kern = {True: "liger", False: "plain", None: "stage"}[row["liger"]]
    name = f"{row['model']:<10} {kern:<5} {row['mode']:<6}"
    if "error" in row:
        return f"{name} ERROR {row['error']}"
    mfu = f"{row['mfu'] * 100:5.1f}%" if row.get("mfu") is not None else "     -"
    mem = f"{row['peak_mem_gib']:7.1f}" if "peak_mem_gib" in row else "      -"
    tflops = f"{row['model_tflops']:8.1f}" if row.get("model_tflops") is not None else "       -"
    ratio = f"{row['vs_best_peer']:6.2f}x" if row.get("vs_best_peer") is not None else "      -"
    return f"{name} {row['samples_per_s']:9.2f} {row['tokens_per_s']:10.0f} {tflops} {mfu} {mem} {ratio}"


HEADER = f"{'rows':<10} {'kern':<5} {'mode':<6} {'samples/s':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>7} {'vs peer':>7}"


def finish(rows: list[dict], flops: dict, peak_tflops) -> dict:
    """MFU from the plain FLOP counts; each row's ratio to the best peer row (class/llava, bf16 +/- Liger)
    of its step; the loss curves of `ours` vs `ours-off`."""
    best = {}
    for r in rows:
        if r["model"] in ("class", "llava") and "error" not in r:
            best[r["mode"]] = max(best.get(r["mode"], 0), r["samples_per_s"])
    for r in rows:
        if "error" in r:
            continue
        n = flops.get(("llava" if r["model"] == "llava" else "mgm", r["mode"]))
        if n:
            r["model_tflops"] = round(n / r["step_s"] / 1e12, 2)
            r["mfu"] = round(r["model_tflops"] / peak_tflops, 4) if peak_tflops else None
        r["vs_best_peer"] = round(r["samples_per_s"] / best[r["mode"]], 3) if best.get(r["mode"]) else None
    curves = {}
    for mode in {r["mode"] for r in rows}:
        on = next((r for r in rows if r["model"] == "ours" and r["mode"] == mode and "losses" in r), None)
        off = next((r for r in rows if r["model"] == "ours-off" and r["mode"] == mode and "losses" in r), None)
        if on and off:
            d = [abs(x - y) for x, y in zip(on["losses"], off["losses"])]
            curves[mode] = {"ours": on["losses"], "ours_off": off["losses"], "max_abs_diff": round(max(d), 5),
                            "mean_abs_diff": round(sum(d) / len(d), 5)}
    return curves


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
    ap.add_argument("--rows", default="ours-off,class,llava,ours,ours-dedup",
                    help="ours-off, class, llava (plain bf16; Liger too where it imports), ours, ours-nopin, ours-dedup "
                         "(+ ours-try with --try)")
    ap.add_argument("--liger", default="auto", choices=["auto", "on", "off"], help="auto: class/llava Liger rows if it imports")
    ap.add_argument("--deepspeed", default="", help="ours rows through DeepSpeed with this config")
    ap.add_argument("--try", dest="try_levers", default="",
                    help="ours-try rows: the defaults with these levers changed, e.g. mining_matmul=true,loss_impl=liger")
    ap.add_argument("--cuda_workers", type=int, default=None, help="override train.cuda_workers (e.g. 0 where /dev/shm is small)")
    ap.add_argument("--profile", default="", help="write a torch.profiler table of one `ours` step per mode here")
    ap.add_argument("--peak_tflops", type=float, default=None, help="for MFU; default from the GPU name")
    ap.add_argument("--out", default="bench/out/train_throughput.json")
    ap.add_argument("--_job", default="", help=argparse.SUPPRESS)  # internal: run one group, in this process
    ap.add_argument("--_pin", action="store_true", help=argparse.SUPPRESS)  # read before torch loads (top of file)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    big = a.preset == "mgm-2b"
    a.batch = a.batch or (16 if big else 4)
    a.seq = a.seq or (640 if big else 96)
    a.lora_r = a.lora_r or (128 if big else 8)
    a.warmup = a.warmup if a.warmup is not None else (3 if device == "cuda" else 1)
    a.modes = a.modes.split(",")
    which = a.rows.split(",")
    tried = tried_levers(a.try_levers) if a.try_levers else None  # a bad --try fails before any row runs
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
    meta = {"device": gpu, "preset": a.preset, "batch": a.batch, "seq": a.seq, "attn": a.attn, "lora_r": a.lora_r,
            "steps": a.steps, "warmup": a.warmup, "peak_tflops": a.peak_tflops,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    if a._job:
        return run_job(a, device, tried, ligers)
    print(f"device {gpu}, preset {a.preset}, batch {a.batch} x {a.seq} tokens, {a.attn}, LoRA r{a.lora_r}, "
          f"{a.steps} timed steps after {a.warmup}; liger: {'yes' if has_liger else 'not installed'}")
    print(HEADER)
    rows, flops, profiles = [], {}, []
    for job in jobs(which, ligers, tried is not None, "stage1" in a.modes):
        got = spawn(job, a)
        rows += got["rows"]
        flops.update({tuple(k.split("/")): v for k, v in got.get("flops", {}).items()})
        profiles += got.get("profiles", [])
        write_json(a.out, {**meta, "partial": True, "rows": rows})  # a run cut short keeps what it measured
    if {("mgm", m) for m in a.modes} - set(flops) and any(r["model"].startswith("ours") for r in rows):
        # ours without a plain class row: count the class's FLOPs (in a process of its own: the float32
        # counting pass can run out of memory where the bf16 rows did not, an 80 GB H100)
        flops.update({tuple(k.split("/")): v for k, v in spawn("flops", a).get("flops", {}).items()})
    curves = finish(rows, flops, a.peak_tflops)
    print("\n" + HEADER)
    for r in rows:
        print(fmt(r))
    for mode, c in curves.items():
        print(f"loss curve {mode}: ours vs ours-off, max |diff| {c['max_abs_diff']}, mean {c['mean_abs_diff']}\n"
              f"  ours     {c['ours']}\n  ours-off {c['ours_off']}")
    write_json(a.out, {**meta, "flops_per_step": {f"{k[0]}/{k[1]}": v for k, v in flops.items()}, "rows": rows,
                       "loss_curves": curves})
    if a.profile and profiles:
        Path(a.profile).write_text("\n\n".join(profiles) + "\n")
    print(f"wrote {a.out}")


def jobs(which: list[str], ligers: list[bool], tried: bool, stage1: bool) -> list[str]:
    """The groups of rows to run, each in its own process: `<row>` or `<row>+liger`. The headline rows
    (ours and the peers) first: a run cut short by its time limit keeps them."""
    out = [w for w in ("ours", "class", "llava") if w in which]
    out += [f"{w}+liger" for w in ("class", "llava") if w in which and True in ligers]
    out += ["ours-try"] if tried else []
    out += ["ours-dedup"] if "ours-dedup" in which and stage1 else []
    return out + [w for w in ("ours-nopin", "ours-off") if w in which]


def spawn(job: str, a) -> dict:
    """Run one group in a child process of this script; a crash becomes an error row, not a lost run."""
    with tempfile.TemporaryDirectory(prefix="vlmlab-bench.") as tmp:
        out = Path(tmp) / "job.json"
        args = [x for x in sys.argv[1:] if x != "--_pin"] + ["--_job", job, "--out", str(out)]
        if job in ("ours", "ours-try", "ours-dedup"):  # what the train stage runs: pinned as stages/train.py
            args.append("--_pin")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args])
        print(f"[{job}: {time.perf_counter() - t0:.0f} s, exit {proc.returncode}]", flush=True)
        if out.is_file():
            return json.loads(out.read_text())
    name, liger = job.removesuffix("+liger"), job.endswith("+liger")
    if name == "flops":
        return {"rows": []}
    return {"rows": [{"model": name, "liger": liger if name in ("class", "llava") else None, "mode": m,
                      "error": f"process exited {proc.returncode}"} for m in a.modes]}


def run_job(a, device: str, tried, ligers) -> None:
    """One group's rows (and, in a plain class/llava group, their FLOP counts) into a.out."""
    from vlmlab.train.fast import Levers

    name, liger = a._job.removesuffix("+liger"), a._job.endswith("+liger")
    flops, profiles = {}, [] if a.profile else None
    if name == "flops":
        torch.manual_seed(0)
        model, image_id, n_image, vocab, side, side_aux = build("mgm", a.preset, device, a.attn)
        batch = synthetic_batch(a.batch, a.seq, image_id, n_image, vocab, side, side_aux, device)
        for mode in a.modes:
            model = apply_mode(model, "mgm", mode, a.lora_r)
            try:
                flops["mgm", mode] = count_flops(model, batch, device)
            except torch.OutOfMemoryError as e:
                print(f"FLOPs of {mode} not counted (MFU left out): {str(e)[:200]}", flush=True)
                model.zero_grad(set_to_none=True)
                free(device)
        rows = []
    elif name in ("class", "llava"):
        rows = bench_family("mgm" if name == "class" else "llava", liger, a, device, flops)
    elif name == "ours-dedup":
        rows = [bench_ours(name, "stage1", a, device, per_image=3)]
    else:
        levers = {"ours-off": Levers(), "ours-try": tried}.get(name)
        rows = [bench_ours(name, m, a, device, levers=levers, profile=profiles if name == "ours" else None)
                for m in a.modes]
    write_json(a.out, {"rows": rows, "flops": {f"{k[0]}/{k[1]}": v for k, v in flops.items()},
                       "profiles": profiles or []})


def tried_levers(spec: str):
    """params.yaml's levers with `key=value,...` changed (values typed as the field's default)."""
    from dataclasses import replace

    from vlmlab.params import load as load_params
    from vlmlab.train.fast import Levers

    base = Levers.from_params(load_params(Path(__file__).resolve().parents[1] / "params.yaml")["train"])
    changes = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if not hasattr(base, key):
            raise SystemExit(f"--try {item}: no lever {key!r} (see params.yaml train:)")
        kind = type(getattr(base, key))
        changes[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return replace(base, **changes)


def write_json(path: str, result: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
