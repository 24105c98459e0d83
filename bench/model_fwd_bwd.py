"""MGM-2B shapes, random init: parameters by module (vs. the real MGM-2B) and forward+backward cost.

    python bench/model_fwd_bwd.py --out bench_model.json                       # mgm-2b, bf16, one GPU
    python bench/model_fwd_bwd.py --preset tiny --steps 2 --warmup 1 --batch-size 4 --out /tmp/m.json   # CPU smoke

Each setting runs `--warmup` untimed then `--steps` timed optimizer-free steps (forward with
labels, backward; gradients zeroed) on a batch of `--batch-size` samples: 336 px + 768 px
views, `num_image_tokens` image tokens (576 for MGM-2B) + `--text-tokens` text tokens, loss
on the text. Settings follow MGM's recipe: towers frozen always; `stage1` trains projector +
mining; `stage2` (full fine-tune) also the LM. Peak memory is torch's max allocated.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` from a plain checkout
from vlmlab.models import presets  # noqa: E402
from vlmlab.models.mgm import MgmForConditionalGeneration  # noqa: E402

# MGM-2B as published (Gemma-2B + CLIP ViT-L/14-336 + OpenCLIP ConvNeXt-L trunk + glue), counted
# from the architectures' own shapes: Gemma-2B 2,506,172,416 (tied embeddings); CLIP-L/14 vision
# 303,179,776 at 224 px + 320 more position rows x 1024 at 336 px; timm convnext_large 197,767,336
# minus its head (1536x1000+1000) and final norm (2x1536); mlp2x_gelu 1024->2048->2048;
# mining: LayerNorm+Linear 1024->1024, and 2x LayerNorm+Linear 2880->1024.
MGM_2B_PARAMS = {
    "language_model": 2_506_172_416,
    "vision_tower": 303_179_776 + 320 * 1024,
    "vision_tower_aux": 197_767_336 - (1536 * 1000 + 1000) - 2 * 1536,
    "mm_projector": 1024 * 2048 + 2048 + 2048 * 2048 + 2048,
    "vlm_uni_query_projector": 2 * 1024 + 1024 * 1024 + 1024,
    "vlm_uni_aux_projector": 2 * 2880 + 2880 * 1024 + 1024,
    "vlm_uni_val_projector": 2 * 2880 + 2880 * 1024 + 1024,
}
GLUE = ("mm_projector", "vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector")


def build(preset: str, device: str, dtype: torch.dtype, attn: str | None, vocab: int = 512):
    kw = {"image_token_id": vocab - 1, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
    if preset == "tiny":
        kw["vocab_size"] = vocab  # mgm-2b keeps Gemma's 256000 rows: the LM head is a real cost
    if attn:
        kw["attn_implementation"] = attn
    config = presets.build_config(preset, **kw)
    if preset != "tiny":
        config.image_token_id = config.text_config.vocab_size  # the processor's added <image>
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: a 3B CPU init takes minutes
        model = MgmForConditionalGeneration(config)
    return model.to(dtype)


def make_batch(model, batch_size: int, text_tokens: int, device: str, dtype: torch.dtype) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    n_img = cfg.num_image_tokens
    text = torch.randint(3, min(cfg.image_token_id, 32000), (batch_size, text_tokens), generator=g)  # no <image>
    ids = torch.cat([torch.full((batch_size, 1), 2), torch.full((batch_size, n_img), cfg.image_token_id), text], 1)
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
            "pixel_values": torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=g).to(device, dtype),
            "pixel_values_aux": torch.randn(batch_size, 3, cfg.image_size_aux, cfg.image_size_aux,
                                            generator=g).to(device, dtype)}


def set_trainable(model, setting: str) -> int:
    model.requires_grad_(False)
    names = list(GLUE) + (["language_model"] if setting == "stage2" else [])
    for n in names:
        getattr(model, n).requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_setting(model, batch, setting: str, steps: int, warmup: int, device: str, grad_ckpt: bool) -> dict:
    trainable = set_trainable(model, setting)
    model.train()
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    if grad_ckpt:
        model.gradient_checkpointing_disable()
    times.sort()
    row = {"setting": setting, "trainable_params": trainable, "median_s": times[len(times) // 2],
           "min_s": times[0], "samples_per_s": batch["input_ids"].shape[0] / times[len(times) // 2],
           "loss": loss.item()}
    if device.startswith("cuda"):
        row["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mgm-2b", choices=sorted(presets.PRESETS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--settings", default="stage1,stage2", help="comma list of stage1, stage2")
    ap.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) | float32 (CPU default)")
    ap.add_argument("--attn", default=None, help="eager | sdpa | flash_attention_2 (default: transformers')")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on the LM and ViT")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="JSON of the numbers")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32"))

    model = build(a.preset, a.device, dtype, a.attn)
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}
    counts["total"] = sum(counts.values())
    print(f"{a.preset}: parameters by module (ours vs. MGM-2B as published)")
    print(f"  {'module':26s} {'ours':>15s} {'MGM-2B':>15s}")
    for n, c in counts.items():
        ref = MGM_2B_PARAMS.get(n, sum(MGM_2B_PARAMS.values()) if n == "total" else None)
        flag = "" if a.preset != "mgm-2b" or ref == c else "   (differs)"
        print(f"  {n:26s} {c:>15,d} {ref:>15,d}{flag}")
    batch = make_batch(model, a.batch_size, a.text_tokens, a.device, dtype)
    seq = batch["input_ids"].shape[1]
    print(f"\nforward+backward, batch {a.batch_size} x {seq} tokens ({model.config.num_image_tokens} image), "
          f"{model.config.image_size}/{model.config.image_size_aux} px, {dtype}, {a.device}, "
          f"attn {model.config.text_config._attn_implementation}, grad_ckpt {a.grad_ckpt}")
    rows = []
    for s in a.settings.split(","):
        row = time_setting(model, batch, s.strip(), a.steps, a.warmup, a.device, a.grad_ckpt)
        rows.append(row)
        mem = f", peak {row['peak_alloc_gib']:.1f} GiB" if "peak_alloc_gib" in row else ""
        print(f"  {s:7s} trainable {row['trainable_params']:>13,d}: {row['median_s'] * 1000:8.1f} ms/step "
              f"({row['samples_per_s']:.1f} samples/s){mem}")
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    result = {"preset": a.preset, "device": device_name, "dtype": str(dtype), "batch_size": a.batch_size,
              "seq_len": seq, "image_size": model.config.image_size, "image_size_aux": model.config.image_size_aux,
              "params": counts, "mgm_2b_params": MGM_2B_PARAMS, "settings": rows, "grad_ckpt": a.grad_ckpt,
              "torch": torch.__version__}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
