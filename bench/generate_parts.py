"""Where the batched generation path spends its time, part by part, with variants: the
vision towers eager, channels_last and torch.compile'd; patch mining; the prefix prefill of
the language model with and without a padding mask. Informs bench/generate.py's choices.

    python bench/generate_parts.py --out parts.json                     # mgm-2b, bf16, CUDA
    python bench/generate_parts.py --preset tiny --images 4 --out /tmp/p.json   # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.generate import build  # noqa: E402


def bilinear_matrix(n_out: int, n_in: int, device, dtype) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D bilinear resizing, align_corners=False, as PyTorch computes them."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    w = src - lo
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    a[torch.arange(n_out), lo] += 1 - w
    a[torch.arange(n_out), hi] += w
    return a.to(device, dtype)


def upsample_matmul(m: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling of a channels-last (B, C, h, w) map as two matmuls, result channels-last."""
    B, C, h, w = m.shape
    x = m.permute(0, 2, 3, 1)                                                     # (B, h, w, C)
    y = torch.matmul(bilinear_matrix(size, w, m.device, m.dtype), x)             # (B, h, W, C)
    z = torch.matmul(bilinear_matrix(size, h, m.device, m.dtype), y.reshape(B, h, size * C))  # (B, H, W*C)
    return z.view(B, size, size, C).permute(0, 3, 1, 2)


def timeit(fn, device: str, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mgm-2b")
    ap.add_argument("--images", type=int, default=32, help="images per tower call")
    ap.add_argument("--prefixes", type=int, default=0, help="prefixes per prefill (0: --images, as the decoder's prefix_batch)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--max-autotune", action="store_true", help="also time ConvNeXt under max-autotune (slow compile)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, proc = build(args.preset, device, dtype, "sdpa")
    g = torch.Generator(device=device).manual_seed(0)
    n = args.images
    pv = torch.randn(n, 3, proc.image_size, proc.image_size, device=device, generator=g).to(dtype)
    pva = torch.randn(n, 3, proc.image_size_aux, proc.image_size_aux, device=device, generator=g).to(dtype)
    res: dict[str, float | str] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                   "preset": args.preset, "images": n, "prefixes": args.prefixes or n}
    run = torch.inference_mode()

    @run
    def clip():
        return model.encode_low_res(pv)

    @run
    def convnext():
        return model.encode_high_res(pva)

    tokens, aux = clip(), convnext()

    @run
    def mining():
        return model.mine_patches(tokens, aux)

    with torch.inference_mode():
        # the three stage maps of a chunk, as encode_high_res upsamples them (channels-last from HF's ConvNeXt)
        stages = [torch.randn(n, c, proc.image_size_aux // f, proc.image_size_aux // f, device=device, generator=g)
                  .to(dtype).contiguous(memory_format=torch.channels_last)
                  for c, f in ((384, 8), (768, 16), (1536, 32))]
        size = (proc.image_size_aux // 4,) * 2
        ref = [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in stages]
        # MGM upsamples in float32 and casts back; encode_high_res does it in the map's dtype
        up32 = [F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False).to(dtype) for t in stages]
        res["upsample_native_vs_float32_max_abs_diff"] = max(float((a.float() - b.float()).abs().max())
                                                             for a, b in zip(up32, ref))
        res["upsample_native_vs_float32_equal_frac"] = min(float((a == b).float().mean()) for a, b in zip(up32, ref))
        del up32
        mm = [upsample_matmul(t, size[0]) for t in stages]
        res["upsample_matmul_rel_err"] = max(float((a.float() - b.float()).norm() / b.float().norm())
                                             for a, b in zip(mm, ref))
        del ref, mm
    res["upsample_channels_last_s"] = timeit(run(lambda: [F.interpolate(t, size=size, mode="bilinear",
                                                                       align_corners=False) for t in stages]), device)
    res["upsample_nchw_s"] = timeit(run(lambda: [F.interpolate(t.contiguous(), size=size, mode="bilinear",
                                                               align_corners=False) for t in stages]), device)
    res["upsample_matmul_s"] = timeit(run(lambda: [upsample_matmul(t, size[0]) for t in stages]), device)
    del stages
    res["clip_s"] = timeit(clip, device)
    res["convnext_s"] = timeit(convnext, device)
    res["mining_s"] = timeit(mining, device)

    # channels_last: ConvNeXt permutes NCHW <-> NHWC around every block's LayerNorm/MLP; in
    # channels_last those permutes are views
    tower = model.vision_tower_aux
    tower.to(memory_format=torch.channels_last)
    pva_cl = pva.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        diff = (model.encode_high_res(pva_cl).float() - aux.float()).norm() / aux.float().norm()
    res["convnext_channels_last_s"] = timeit(run(lambda: model.encode_high_res(pva_cl)), device)
    res["convnext_channels_last_rel_diff"] = float(diff)
    tower.to(memory_format=torch.contiguous_format)
    if device == "cuda":  # cuDNN's own algorithm search (shapes are fixed per prefix chunk)
        torch.backends.cudnn.benchmark = True
        res["convnext_cudnn_benchmark_s"] = timeit(convnext, device)
        tower.to(memory_format=torch.channels_last)
        res["convnext_channels_last_cudnn_benchmark_s"] = timeit(run(lambda: model.encode_high_res(pva_cl)), device)
        tower.to(memory_format=torch.contiguous_format)
        torch.backends.cudnn.benchmark = False
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            convnext()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70)
        print(table)
        Path(args.out).with_suffix(".profile.txt").write_text(table)

    # the prefix prefill: equal-length prefixes (no mask: causal flash) vs the same with a mask
    P = model.config.num_image_tokens + 4
    m = args.prefixes or n
    embeds = torch.randn(m, P, model.config.text_config.hidden_size, device=device, generator=g).to(dtype)
    mask = torch.ones(m, P, dtype=torch.long, device=device)
    mask[0, :1] = 0  # one padded row forces the masked kernel
    pos = torch.arange(P, device=device)[None].expand(m, P)
    lm = model.language_model.base_model
    res["prefix_lm_nomask_s"] = timeit(run(lambda: lm(inputs_embeds=embeds, position_ids=pos, use_cache=True)), device)
    res["prefix_lm_mask_s"] = timeit(run(lambda: lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                                    use_cache=True)), device)
    flops = 2 * sum(p.numel() for n_, p in lm.named_parameters() if "embed" not in n_) * m * P
    res["prefix_lm_nomask_tflops"] = round(flops / res["prefix_lm_nomask_s"] / 1e12, 1)

    save(res, args.out)
    if device == "cuda" and not args.no_compile:
        for name, fn in (("clip", model.encode_low_res), ("convnext", model.encode_high_res),
                         ("mining", model.mine_patches)):
            compiled = torch.compile(fn, dynamic=False)
            inputs = {"clip": (pv,), "convnext": (pva,), "mining": (tokens, aux)}[name]
            t0 = time.perf_counter()
            try:
                res[f"{name}_compiled_s"] = timeit(run(lambda: compiled(*inputs)), device)
                res[f"{name}_compile_wall_s"] = round(time.perf_counter() - t0, 1)
            except Exception as e:  # report, keep measuring the rest
                res[f"{name}_compile_error"] = f"{type(e).__name__}: {e}"[:300]
        compiled_lm = torch.compile(lm, dynamic=False)
        try:
            res["prefix_lm_nomask_compiled_s"] = timeit(
                run(lambda: compiled_lm(inputs_embeds=embeds, position_ids=pos, use_cache=True)), device)
        except Exception as e:
            res["prefix_lm_compile_error"] = f"{type(e).__name__}: {e}"[:300]

    if device == "cuda" and args.max_autotune:  # Triton GEMMs with fused epilogues; compiles for minutes
        t0 = time.perf_counter()
        tuned = torch.compile(model.encode_high_res, mode="max-autotune-no-cudagraphs", dynamic=False)
        try:
            res["convnext_max_autotune_s"] = timeit(run(lambda: tuned(pva)), device)
            res["convnext_max_autotune_compile_wall_s"] = round(time.perf_counter() - t0, 1)
        except Exception as e:
            res["convnext_max_autotune_error"] = f"{type(e).__name__}: {e}"[:300]
        save(res, args.out)
    save(res, args.out, show=True)


def save(res: dict, out: str, show: bool = False) -> None:
    """(Re)write the JSON, so that a run cut short keeps what it measured; print the table at the end."""
    for k, v in res.items() if show else ():
        print(f"{k:<42}{v if isinstance(v, str) else round(v, 4) if isinstance(v, float) else v}")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
