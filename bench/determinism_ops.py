"""Which torch CPU ops give different bits under a forced setting: fixed inputs (numpy RNG), one line per op.

    python bench/determinism_ops.py > a.txt; ATEN_CPU_CAPABILITY=default python bench/determinism_ops.py > b.txt
    diff a.txt b.txt     # the ops whose kernels depend on that setting
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
    "exp": lambda: x.exp(),
    "tanh": lambda: x.tanh(),
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
    "adamw step": lambda: _adamw(),
    "clip_grad_norm": lambda: _clip(),
}


def _adamw():
    p = torch.nn.Parameter(t(300, 200))
    opt = torch.optim.AdamW([p], lr=1e-3)
    for _ in range(3):
        p.grad = t(300, 200)
        opt.step()
    return p


def _clip():
    p = torch.nn.Parameter(t(300, 200))
    p.grad = t(300, 200)
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    return p.grad


for name, f in ops.items():
    rng = np.random.default_rng(0)
    print(f"{name:36s} {h(f())}")
