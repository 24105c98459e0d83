"""CPU GEMMs as vlmlab pins them (vlmlab/cpu_gemm.py): the bits, to compare machines, and the speed against MKL.

    python bench/gemm_bits.py bits  [--out F]   # numpy only: digests of products of seeded operands
    python bench/gemm_bits.py speed [--out F]   # torch under pin(): OpenBLAS route vs MKL COMPATIBLE, one run
    python bench/gemm_bits.py steps [--out F]   # tiny MGM training steps, pin()'s route vs MKL + SDPA's fused kernel

`bits` computes with numpy alone (the constraints file's pin; torch is imported, not used), so it also runs on a
host with another torch build (the GPU machine's CPU): equal digests on two CPUs mean equal GEMM bits there.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# tiny-world shapes (rows x inner x cols): tower patches, LM tokens, the teacher's 50272-row head, a backward's
# transposed operands, matrix-vector, batched attention
SHAPES = [(2304, 96, 288), (2304, 288, 96), (4096, 128, 512), (1024, 64, 50272), (512, 512, 512),
          (37, 129, 65), (1, 128, 512), (128, 1, 64), (300, 700, 1)]
BATCHED = [(64, 36, 48, 36), (32, 145, 32, 145), (8, 1, 64, 137)]


def cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return platform.processor()


def bits(out: str = "") -> dict:
    os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")  # as vlmlab.determinism.ENV, before numpy loads
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy as np

    from vlmlab import cpu_gemm

    rng = np.random.Generator(np.random.PCG64(0))
    h, rows = hashlib.sha256(), {}
    for dtype in (np.float32, np.float64):
        for m, k, n in SHAPES:
            a, b = rng.random((m, k), dtype=dtype) - 0.5, rng.random((n, k), dtype=dtype) - 0.5
            for name, prod in (("nt", a @ b.T), ("tn", a.T.copy().T @ b.T.copy()),
                               ("tt", (a.T.copy()).T @ (b.copy()).T)):
                d = hashlib.sha256(np.ascontiguousarray(prod).tobytes()).hexdigest()[:12]
                rows[f"{np.dtype(dtype).name} {m}x{k}x{n} {name}"] = d
                h.update(d.encode())
        for bsz, m, k, n in BATCHED:
            a, b = rng.random((bsz, m, k), dtype=dtype) - 0.5, rng.random((bsz, k, n), dtype=dtype) - 0.5
            d = hashlib.sha256((a @ b).tobytes()).hexdigest()[:12]
            rows[f"{np.dtype(dtype).name} {bsz}x{m}x{k}x{n} batched"] = d
            h.update(d.encode())
    result = {"digest": h.hexdigest()[:16], "cpu": cpu(), "numpy": np.__version__, "openblas": cpu_gemm.corename(),
              "products": rows}
    _emit(result, out)
    return result


def speed(out: str = "", repeats: int = 5) -> dict:
    from vlmlab.determinism import pin

    pin()
    import torch

    result = {"cpu": cpu(), "torch": torch.__version__, "rows": []}
    for m, k, n in SHAPES[:5]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        row = {"shape": f"{m}x{k}x{n}"}
        for name, fn in (("openblas", lambda: torch.mm(a, b)),  # pin() routes it (vlmlab/cpu_gemm.py)
                         ("mkl_compatible", lambda: torch.ops.aten.mm.out(a, b, out=torch.empty(m, n)))):
            fn()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            row[f"{name}_gflops"] = round(2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9, 1)
        row["max_abs_diff"] = float((torch.mm(a, b) - torch.ops.aten.mm.out(a, b, out=torch.empty(m, n))).abs().max())
        result["rows"].append(row)
    _emit(result, out)
    return result


def steps(out: str = "", rounds: int = 3, n: int = 4) -> dict:
    """Forward + backward of the tiny MGM (bench/model_fwd_bwd.py's batch: 32 samples, 145 tokens), stage 1 and
    stage 2 trainables, alternating between pin()'s route (OpenBLAS GEMMs, SDPA's math path) and the previous pin
    (MKL COMPATIBLE GEMMs, SDPA's fused CPU kernel) in one process, so that the machine's drift hits both alike."""
    from vlmlab import cpu_gemm
    from vlmlab.determinism import pin

    pin()
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import model_fwd_bwd as m

    model = m.build("tiny", "cpu", torch.float32, "sdpa")
    batch = m.make_batch(model, 32, 128, "cpu", torch.float32)
    times = {}
    for _ in range(rounds):
        for route in ("openblas", "mkl"):
            if route == "mkl":
                cpu_gemm.uninstall()  # the four aten kernels go back to ATen's (MKL)
            torch.backends.cuda.enable_flash_sdp(route == "mkl")
            for setting in ("stage1", "stage2"):
                m.set_trainable(model, setting)
                model(**batch).loss.backward()  # warm-up
                t0 = time.perf_counter()
                for _ in range(n):
                    model.zero_grad(set_to_none=True)
                    model(**batch).loss.backward()
                times.setdefault(f"{setting}_{route}", []).append((time.perf_counter() - t0) / n * 1e3)
            if route == "mkl":
                cpu_gemm.install()
    result = {"cpu": cpu(), "torch": torch.__version__, "ms_per_step": {k: [round(v, 1) for v in vs]
                                                                         for k, vs in times.items()}}
    for setting in ("stage1", "stage2"):
        result[f"{setting}_speedup"] = round(min(times[f"{setting}_mkl"]) / min(times[f"{setting}_openblas"]), 2)
    _emit(result, out)
    return result


def _emit(result: dict, out: str) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":  # no fire: the GPU machine lacks it
    cmd, args = sys.argv[1], sys.argv[2:]
    {"bits": bits, "speed": speed, "steps": steps}[cmd](out=args[args.index("--out") + 1] if "--out" in args else "")
