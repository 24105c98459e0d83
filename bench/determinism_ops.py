"""Which torch CPU ops give different bits under a forced setting: fixed inputs (numpy RNG), one line per op.

    python bench/determinism_ops.py > a.txt; ATEN_CPU_CAPABILITY=default python bench/determinism_ops.py > b.txt
    diff a.txt b.txt     # the ops whose kernels depend on that setting

MKL_CBWR=COMPATIBLE vs AVX2 on an Intel CPU shows MKL's VML (exp, log, erf, tanh, sqrt, pow 0.5, the per-tensor
AdamW): VML follows the CPU vendor, so the stages avoid it (vlmlab/determinism.py). Run the same command on two
machines and diff the files to compare them (the first line names the CPU).
"""
import hashlib

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
rng = np.random.default_rng(0)


def t(*shape):
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def h(x):
    return hashlib.sha256(x.detach().contiguous().numpy().tobytes()).hexdigest()[:10]


x, w, img = t(64, 300), t(300, 200), t(8, 3, 32, 32)
q, k, v = t(4, 2, 40, 32), t(4, 2, 40, 32), t(4, 2, 40, 32)
ops = {
    "randn (init)": lambda: (torch.manual_seed(0), torch.randn(1000))[1],
    "normal_ (init)": lambda: (torch.manual_seed(0), torch.empty(1000).normal_(0, 0.02))[1],
    "mm (MKL sgemm)": lambda: x @ w,
    "sum": lambda: x.sum(1),
    "mean": lambda: x.mean(),
    "exp (VML)": lambda: x.exp(),
    "log (VML)": lambda: (x.abs() + 1e-3).log(),
    "erf (VML)": lambda: x.erf(),
    "sqrt (VML)": lambda: x.abs().sqrt(),
    "pow 0.5 (VML sqrt)": lambda: x.abs().pow(0.5),
    "cos (VML, same bits on every path measured)": lambda: x.cos(),
    "tanh (VML)": lambda: x.tanh(),
    "softmax": lambda: x.softmax(-1),
    "log_softmax": lambda: x.log_softmax(-1),
    "layer_norm": lambda: F.layer_norm(x, (300,)),
    "rms (pow/mean/rsqrt)": lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),
    "gelu (erf)": lambda: F.gelu(x),
    "gelu (tanh)": lambda: F.gelu(x, approximate="tanh"),
    "silu": lambda: F.silu(x),
    "cross_entropy": lambda: F.cross_entropy(x, torch.arange(64) % 300),
    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "conv2d 3->24 k8 s8 (patch embed)": lambda: F.conv2d(img, t(24, 3, 8, 8), stride=8),
    "conv2d depthwise 7x7": lambda: F.conv2d(t(8, 24, 12, 12), t(24, 1, 7, 7), padding=3, groups=24),
    "adamw step (per tensor: VML sqrt)": lambda: _adamw(),
    "adamw step (fused, as the stages)": lambda: _adamw(fused=True),
    "clip_grad_norm": lambda: _clip(),
}


def _adamw(fused=None):
    p = torch.nn.Parameter(t(300, 200))
    opt = torch.optim.AdamW([p], lr=1e-3, fused=fused)
    for _ in range(3):
        p.grad = t(300, 200)
        opt.step()
    return p


def _clip():
    p = torch.nn.Parameter(t(300, 200))
    p.grad = t(300, 200)
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    return p.grad


print("cpu", next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"),
      "| torch", torch.__version__)
for name, f in ops.items():
    rng = np.random.default_rng(0)
    print(f"{name:36s} {h(f())}")
