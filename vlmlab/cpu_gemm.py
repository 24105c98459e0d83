"""CPU matrix products through numpy's OpenBLAS, pinned to its Haswell kernels: the same bits on any x86-64-v3 CPU,
and 2.5-3.6x MKL's speed under the pin.

Why not torch's own GEMM: its wheel calls MKL, and the one MKL code path that Intel and AMD CPUs both run is
COMPATIBLE (vlmlab/determinism.py), which ran 18-26 GFLOP/s on one thread of a 2-core AMD EPYC where OpenBLAS's
Haswell kernels ran 62-82 (tiny-world shapes, `python bench/gemm_bits.py speed`,
bench/results/gemm_speed_amd_zen3.json). OpenBLAS's kernel
for a core type is fixed code (assembly, blocking constants of that core), so pinning the type
(OPENBLAS_CORETYPE=Haswell, read when numpy loads it) pins the bits, as MKL_CBWR does for MKL. numpy bundles
its OpenBLAS in its wheel, so the library version is the constraints file's numpy pin.

`install()` replaces the CPU kernels of aten::mm, addmm, bmm and baddbmm (what Linear, matmul and the SDPA math
path dispatch to, forward and backward) for float32 and float64. Other dtypes, and the kernels that call BLAS from
inside ATen (im2col convolution, SDPA's fused CPU kernel), stay on MKL under its COMPATIBLE pin; pin() sends
CPU attention to SDPA's math path so that it reaches these ops. CUDA tensors never come here (CPU key only).
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import torch

_FLOATS = (torch.float32, torch.float64)
_LIB: torch.library.Library | None = None  # keeps the registration alive; None: not installed


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()  # a view (strides kept); below autograd, detach only drops the flag


def _ours(*ts: torch.Tensor) -> bool:
    return ts[0].dtype in _FLOATS and all(t.dtype == ts[0].dtype and not t.is_conj() and not t.is_neg() for t in ts)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.matmul(_np(a), _np(b)))


def _out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An empty result for ATen's own `.out` kernel (the ops not ours: other dtypes), 2-d or batched."""
    return a.new_empty((*a.shape[:-1], b.shape[-1]))


def _scaled(prod: torch.Tensor, inp: torch.Tensor, beta, alpha) -> torch.Tensor:
    """beta * inp + alpha * prod, as ATen defines addmm (beta 0: inp ignored, NaNs included)."""
    if alpha != 1:
        prod.mul_(alpha)
    if beta == 0:
        return prod
    return prod.add_(inp if beta == 1 else inp * beta)


def mm(a, b):
    return _product(a, b) if _ours(a, b) else torch.ops.aten.mm.out(a, b, out=_out(a, b))


def bmm(a, b):
    return _product(a, b) if _ours(a, b) else torch.ops.aten.bmm.out(a, b, out=_out(a, b))


def addmm(inp, m1, m2, *, beta=1, alpha=1):
    if not _ours(inp, m1, m2):
        return torch.ops.aten.addmm.out(inp, m1, m2, beta=beta, alpha=alpha, out=_out(m1, m2))
    return _scaled(_product(m1, m2), inp, beta, alpha)


def baddbmm(inp, b1, b2, *, beta=1, alpha=1):
    if not _ours(inp, b1, b2):
        return torch.ops.aten.baddbmm.out(inp, b1, b2, beta=beta, alpha=alpha, out=_out(b1, b2))
    return _scaled(_product(b1, b2), inp, beta, alpha)


def install() -> None:
    """Route the four ops' CPU kernels here, once per process (a second call is a no-op)."""
    global _LIB
    if _LIB is not None:
        return
    import warnings

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # torch warns that an aten kernel is overridden: that is the point
        warnings.simplefilter("ignore")
        for name, fn in (("mm", mm), ("bmm", bmm), ("addmm", addmm), ("baddbmm", baddbmm)):
            lib.impl(name, fn, "CPU")
    _LIB = lib


def uninstall() -> None:
    """ATen's own kernels (MKL) back, e.g. to time both routes in one process (bench/gemm_bits.py steps)."""
    global _LIB
    if _LIB is not None:
        _LIB._destroy()
        _LIB = None


def installed() -> bool:
    return _LIB is not None


def _openblas() -> ctypes.CDLL:
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*.so"))
    if not libs:
        raise RuntimeError("numpy's bundled OpenBLAS not found (numpy.libs/libscipy_openblas*.so): "
                           "vlmlab pins numpy's manylinux wheel (constraints.txt)")
    return ctypes.CDLL(libs[0])


def corename() -> str:
    """The core type OpenBLAS runs its kernels for (pinned: Haswell)."""
    lib = _openblas()
    fn = lib.scipy_openblas_get_corename64_
    fn.restype = ctypes.c_char_p
    return fn().decode().lower()
