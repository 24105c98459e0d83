"""Attention of a one-token decoding step over the filled slots of a static KV cache: one Triton kernel.

Why not SDPA: its flash and cuDNN kernels tile queries by 64-128, so with one query per row most of
their work is padding; on an H200 cuDNN's took ~0.47 ms per OPT-2.7b layer for 768 rows, 55% of a
step (bench/results/synth_profile.txt). Here one program per (row, head) streams the row's keys and
values once, in blocks of BLOCK_N slots, with an online softmax in float32: the step is bound by
memory bandwidth, as a decode step should be.
The filled length is read on the GPU (transformers' StaticLayer.cumulative_length, which the cache
update advances), so one captured CUDA graph serves every step of a decode.
Rows sampled from one prompt (the caption_num candidates of an image) hold the same keys and values in
the prompt's slots: slots < `shared` are read from the group's first row, so the other rows' reads of
the prompt come from L2 rather than HBM. (A grouped kernel, one program per image and head reading the
prompt once for the image's rows, was slower on an H100: 1.04 vs 0.59 ms on 1,536 rows,
bench/results/synth_captioner_h100_d.log. It was removed.)
"""
from __future__ import annotations

import torch

try:  # CPU-only installs have no Triton: the captioner then keeps SDPA
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

CONFIGS = ((16, 1), (16, 2), (32, 1), (32, 2), (64, 4))  # (BLOCK_N, num_warps) tried by pick_config:
# one query per program leaves little work per slot block, so small blocks (more programs in flight) won on an H100


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:
    @triton.jit
    def _decode_kernel(Q, K, V, O, LEN, scale, H, group, shared,
                       sq_r, sq_h, sk_r, sk_h, sk_l, sv_r, sv_h, sv_l, so_r, so_h,
                       D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, BLOCK_N: tl.constexpr):
        # the head dim as [0, D_LO) (a power of two, unmasked) + [D_LO, D_LO + D_HI) (masked to D): padded to
        # one power of two instead (OPT-2.7b's 80 to 128, 3/8 of the lanes idle) the kernel took 0.59 vs 0.41 ms
        # on 1,536 rows of an H100 (bench/results/synth_captioner_h100_e.json)
        pid = tl.program_id(0)
        r = (pid // H).to(tl.int64)  # int64: row * row stride passes 2**31 for ~5k rows of OPT-2.7b
        h = (pid % H).to(tl.int64)
        base = (r // group) * group
        n = tl.load(LEN).to(tl.int32)
        dl = tl.arange(0, D_LO)
        dh = D_LO + tl.arange(0, D_HI)
        hm = dh < D
        q_lo = tl.load(Q + r * sq_r + h * sq_h + dl).to(tl.float32) * scale
        q_hi = tl.load(Q + r * sq_r + h * sq_h + dh, mask=hm, other=0.0).to(tl.float32) * scale
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc_lo = tl.zeros([D_LO], dtype=tl.float32)
        acc_hi = tl.zeros([D_HI], dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            nm = offs < n
            row = tl.where(offs < shared, base, r)
            kp = K + row[:, None] * sk_r + h * sk_h + offs[:, None] * sk_l
            vp = V + row[:, None] * sv_r + h * sv_h + offs[:, None] * sv_l
            k_lo = tl.load(kp + dl[None, :], mask=nm[:, None], other=0.0)
            k_hi = tl.load(kp + dh[None, :], mask=nm[:, None] & hm[None, :], other=0.0)
            v_lo = tl.load(vp + dl[None, :], mask=nm[:, None], other=0.0)
            v_hi = tl.load(vp + dh[None, :], mask=nm[:, None] & hm[None, :], other=0.0)
            s = tl.sum(k_lo.to(tl.float32) * q_lo[None, :], axis=1) + tl.sum(k_hi.to(tl.float32) * q_hi[None, :], axis=1)
            s = tl.where(nm, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc_lo = acc_lo * alpha + tl.sum(p[:, None] * v_lo.to(tl.float32), axis=0)
            acc_hi = acc_hi * alpha + tl.sum(p[:, None] * v_hi.to(tl.float32), axis=0)
            m_i = m_new
        tl.store(O + r * so_r + h * so_h + dl, (acc_lo / l_i).to(O.dtype.element_ty))
        tl.store(O + r * so_r + h * so_h + dh, (acc_hi / l_i).to(O.dtype.element_ty), mask=hm)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, length: torch.Tensor,
                     scale: float, group: int = 1, shared: int = 0, config: tuple[int, int] = (16, 1)) -> torch.Tensor:
    """query (R, H, 1, d), key/value (R, H, L, d) with `length` (a 0-dim integer tensor on the GPU) filled
    slots -> (R, 1, H, d), as transformers' attention functions return. `group`/`shared`: rows
    [g*group, (g+1)*group) hold the same keys/values in slots < shared (read from row g*group)."""
    R, H, q_len, D = query.shape
    if q_len != 1:
        raise ValueError(f"decode_attention: one query per row, got {q_len}")
    out = torch.empty(R, 1, H, D, dtype=query.dtype, device=query.device)
    block_n, warps = config
    lo = 1 << (D.bit_length() - 1)
    hi = triton.next_power_of_2(D - lo) if D > lo else 1  # (1: one masked lane where D is a power of two)
    _decode_kernel[(R * H,)](query, key, value, out, length, float(scale), H, int(group), int(shared),
                             query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
                             value.stride(0), value.stride(1), value.stride(2), out.stride(0), out.stride(2),
                             D=D, D_LO=lo, D_HI=hi, BLOCK_N=block_n, num_warps=warps)
    return out


def reference(query, key, value, n: int, scale: float, group: int = 1, shared: int = 0) -> torch.Tensor:
    """What decode_attention computes, in float32 torch ops (checks)."""
    key, value = key[:, :, :n].float(), value[:, :, :n].float()
    if shared and group > 1:
        base = torch.arange(key.shape[0], device=key.device) // group * group
        key, value = key.clone(), value.clone()
        key[:, :, :shared], value[:, :, :shared] = key[base, :, :shared], value[base, :, :shared]
    weights = (query.float() @ key.transpose(-1, -2) * scale).softmax(-1)
    return (weights @ value).transpose(1, 2).to(query.dtype)


def pick_config(query, key, value, length, scale, group, shared, repeats: int = 5) -> tuple[int, int]:
    """The fastest of CONFIGS on these tensors (CUDA events; compiles each once). Runs outside graph capture."""
    best, best_ms = CONFIGS[0], float("inf")
    for config in CONFIGS:
        decode_attention(query, key, value, length, scale, group, shared, config)  # compile + warm
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            decode_attention(query, key, value, length, scale, group, shared, config)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / repeats
        if ms < best_ms:
            best, best_ms = config, ms
    return best
