"""Bit-for-bit CPU results on any x86-64 machine: pin what makes torch's CPU kernels differ.

Call `pin()` first thing in a stage script, before any tensor op: ATen fixes its kernel ISA at the
first dispatch, MKL its code path at its first call (both after `import torch`, which is fine). What differs between two x86 machines
running the same wheels, and what is pinned here (measured with bench/determinism.py):

- ATen's vectorised kernels are compiled per ISA (DEFAULT / AVX2 / AVX512) and dispatched on the
  CPU: measured different bits for randn/normal_ (weight init), softmax, log_softmax, layer_norm,
  tanh-GELU, SiLU, SDPA and the AdamW step. Pinned to AVX2 (ATEN_CPU_CAPABILITY), which every
  x86-64-v3 CPU has (Intel since Haswell, AMD since Zen); a CPU without AVX2 runs DEFAULT kernels
  and its results differ (check() says so). The ISA is fixed at the first dispatch, not at import.
- MKL's sgemm (every Linear, matmul, im2col convolution) picks a code path per CPU: its own Zen
  kernels on AMD, AVX2/AVX-512 ones on Intel. Its conditional numerical reproducibility (MKL_CBWR)
  honours ISA branches (AVX2, ...) only on Intel: on AMD they silently stay on AUTO (mkl_cbwr_get
  reads back AUTO; same bits as unset). COMPATIBLE is the one branch both vendors run, so it is
  pinned, through mkl_cbwr_set (works after `import torch`, before MKL's first call) and the env.
- oneDNN (torch's mkldnn backend) runs convolutions and the erf-GELU with JIT kernels chosen by ISA,
  with blocking chosen by cache size, so an ISA cap alone does not pin it. It is switched off:
  convolutions go through ATen's im2col + MKL (COMPATIBLE), GELU through ATen's AVX2 kernel.
- numpy dispatches its ufuncs (exp, log, sin, ... in float32 and float64; sorts) per ISA too, with
  AVX-512 variants (X86_V4, AVX512_SKX/ICL/SPR) that round differently from the AVX2 ones. Capped at
  X86_V3 (AVX2) through NPY_ENABLE_CPU_FEATURES, which numpy reads once, at its import: pin() sets it
  before it imports torch (which imports numpy), where the CPU has that level (Linux: cpuinfo), and
  drops NPY_DISABLE_CPU_FEATURES (numpy refuses both); check() raises if numpy came first. Its OpenBLAS
  picks kernels per CPU too (Haswell / SkylakeX / Zen): pinned to Haswell, one thread. No stage
  multiplies numpy matrices today (CIDEr's bootstrap sums with bincount, vlmlab/evaluate/caption_corpus.py).
- Thread counts: ATen splits reductions and MKL its GEMMs by thread count, and MKL may lower its
  count at run time (dynamic threads). The count is the stage's own (pin's argument or its
  params), never the core count; MKL's dynamic adjustment is off.
- MKL's VML, which ATen calls for these float ops on a CPU (aten/src/ATen/cpu/vml.h): exp, log, erf, tanh,
  sqrt (and pow(x, 0.5), and the per-tensor AdamW's sqrt), ... Its code path follows the CPU: on an AVX-512
  Intel Xeon, COMPATIBLE, AVX2 and AVX-512 give three results for each (bench/determinism_ops.py), and MKL_CBWR
  moves VML on Intel but not on AMD, so no pin makes two vendors agree. Not pinned, avoided: the stages use
  the fused AdamW (the CPU's own sqrt), F.gelu for the exact GELU (models.mgm.aten_gelu), numpy for metric
  logs; `VLMLAB_NO_VML=1` makes pin() raise at any such op (the pipeline test runs every stage so). cos and
  sin (the Gemma RoPE's, in transformers) gave the same bits on every path of that CPU: allowed.
- torch.use_deterministic_algorithms(warn_only): CPU kernels here are deterministic at a fixed
  thread count; on GPU hosts it flags the ops that are not.
Not pinned: glibc's libm (scalar std::exp/log/cos in ATen's non-vectorised paths, Python's math in
LR schedules) comes from the OS, so two machines must share the glibc major version (the venv
does not carry it); torch.compile (evaluate.compile) builds C++ with the machine's own compiler.
"""
from __future__ import annotations

import os
import sys

# read by the libraries when they first compute (torch's import does not), and by child processes
ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen kernel ISA (also torch.compile's vector ISA)
    "MKL_CBWR": "COMPATIBLE",       # MKL conditional numerical reproducibility: the branch Intel and AMD share
    "MKL_DYNAMIC": "FALSE",         # MKL uses the thread count it is given, not fewer
    "ONEDNN_MAX_CPU_ISA": "AVX2",   # oneDNN, for any op that still reaches it with mkldnn off
    "OPENBLAS_CORETYPE": "Haswell",  # numpy's OpenBLAS (any np.dot/matmul): AVX2 kernels on every CPU ...
    "OPENBLAS_NUM_THREADS": "1",     # ... and one thread: a split reduction sums in another order
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # GPU hosts: what deterministic cuBLAS needs
    "TORCHINDUCTOR_DETERMINISTIC": "1",    # torch.compile's deterministic mode (what use_deterministic_algorithms sets)
}
MKL_CBWR_BRANCH, MKL_CBWR_COMPATIBLE = 1, 3  # from mkl_cbwr.h


def pin(threads: int = 1) -> dict:
    """Pin kernel ISA, MKL's code path, oneDNN, threads and deterministic algorithms for this process.

    Call it before the first tensor op: ATen fixes its kernel ISA at the first dispatch and MKL its
    branch at its first call. check() reads both back and raises if either was fixed earlier."""
    os.environ.update(ENV)
    if _x86_v3():  # numpy refuses (at import) to enable a level the CPU lacks, and both variables set at once
        os.environ.pop("NPY_DISABLE_CPU_FEATURES", None)
        os.environ["NPY_ENABLE_CPU_FEATURES"] = "X86_V3"  # its ufunc dispatch, read at its import: AVX2, not AVX-512
    import torch

    mkl = _mkl()
    # 0 = MKL_CBWR_SUCCESS; the env alone is read once. MKL refuses any change once it has run, even to
    # the branch in effect: a second pin() in one process (a stage run in-process by a test) is fine.
    if mkl.mkl_serv_cbwr_set(MKL_CBWR_COMPATIBLE) != 0 and mkl.mkl_serv_cbwr_get(MKL_CBWR_BRANCH) != MKL_CBWR_COMPATIBLE:
        raise RuntimeError("MKL refused MKL_CBWR=COMPATIBLE: it already ran before vlmlab.determinism.pin()")
    torch.backends.mkldnn.enabled = False
    # CPU kernels are deterministic at a fixed thread count; on GPU hosts some ops have no deterministic
    # kernel, and training there is not bitwise across GPUs anyway: warn, don't stop the run. The C flag
    # directly: torch.use_deterministic_algorithms also imports inductor (2.2 s a process) to set
    # its config flag, which TORCHINDUCTOR_DETERMINISTIC (ENV) sets at inductor's own import instead
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    from vlmlab import cpu_gemm

    cpu_gemm.install()  # CPU GEMMs on OpenBLAS's Haswell kernels: pinned like MKL_CBWR, 3x faster
    if not torch.cuda.is_available():
        # SDPA's fused CPU kernel calls MKL from inside ATen (COMPATIBLE: slow); its math path is matmuls
        # and a softmax, so attention reaches cpu_gemm. The flag is global, so CUDA hosts keep flash
        torch.backends.cuda.enable_flash_sdp(False)
    set_threads(threads)
    if os.environ.get("VLMLAB_NO_VML") == "1":
        no_vml().__enter__()  # for the rest of the process
    return check()


# float ops ATen computes with MKL's VML on a CPU (vml.h's IMPLEMENT_VML_MKL list; cos/sin left out, see above)
VML_OPS = frozenset({"acos", "asin", "atan", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sqrt", "tan",
                     "tanh"})


def no_vml():
    """A dispatch mode that raises at a VML-backed op on a CPU float tensor (pow(x, 0.5) is VML's sqrt)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoVml(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0].removeprefix("_foreach_").rstrip("_")
            if name == "pow" and len(args) > 1 and not isinstance(args[1], torch.Tensor) and args[1] == 0.5:
                name = "sqrt"
            first = args[0] if args else None
            if isinstance(first, (list, tuple)):  # the _foreach_ ops take a list of tensors
                first = first[0] if first else None
            if (name in VML_OPS and isinstance(first, torch.Tensor) and first.device.type == "cpu"
                    and first.is_floating_point()):
                raise RuntimeError(f"{func.__name__} on a CPU float tensor goes through MKL's VML, whose bits "
                                   "depend on the CPU vendor (vlmlab/determinism.py): compute it another way")
            return func(*args, **(kwargs or {}))

    return NoVml()


def relax_cuda() -> bool:
    """On a CUDA host, the GPU half of pin() undone: torch's deterministic algorithms off and cuBLAS's
    own workspace (pin fixes a small one, which deterministic GEMMs need). CPU kernels stay pinned. Why:
    one H100, stage 2 full at mgm-2b shapes, 30.7 samples/s pinned vs 33.9 not (bench/results/train_pin_h100.*),
    and GPU results are not bitwise across machines either way. Call before the first CUDA op (cuBLAS reads
    its workspace setting once). Returns whether it relaxed anything (False on a CPU-only host)."""
    import torch

    if not torch.cuda.is_available():
        return False
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    os.environ.pop("TORCHINDUCTOR_DETERMINISTIC", None)
    torch.use_deterministic_algorithms(False)  # also inductor's flag, if it was imported already
    return True


def _x86_v3() -> bool:
    """The CPU has numpy's X86_V3 level (AVX2, FMA3, F16C, BMI1/2, LZCNT, MOVBE), read off Linux's cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False  # not Linux: numpy keeps its own dispatch (named in docs/determinism.md)
    return {"avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"} <= set(flags)


def set_threads(threads: int) -> None:
    """Intra-op threads (ATen and MKL), fixed: a param of the stage, never the machine's core count."""
    import ctypes

    import torch

    torch.set_num_threads(int(threads))
    _mkl().mkl_set_dynamic(ctypes.byref(ctypes.c_int(0)))  # MKL's Fortran-style export: takes a pointer


def _mkl():
    """MKL is linked into libtorch_cpu; its service functions are exported there."""
    import ctypes

    import torch

    return ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))


def check() -> dict:
    """What is in effect, read back from the libraries; raises where a pin did not take."""
    import torch

    state = {"aten": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": _mkl().mkl_serv_cbwr_get(MKL_CBWR_BRANCH),
             "mkldnn": torch.backends.mkldnn.enabled, "threads": torch.get_num_threads(),
             "deterministic": torch.are_deterministic_algorithms_enabled()}
    if state["aten"] != "AVX2":
        if not torch.cpu._is_avx2_supported():
            print(f"vlmlab.determinism: this CPU has no AVX2, ATen kernels run as {state['aten']}: results will "
                  "not match AVX2 machines bit for bit", file=sys.stderr)
        else:
            raise RuntimeError(f"ATen kernels run as {state['aten']}, not AVX2: a tensor op ran before "
                               "vlmlab.determinism.pin() and fixed the kernel ISA")
    from numpy._core._multiarray_umath import __cpu_features__ as numpy_isa

    if any(numpy_isa.get(target) for target in ("X86_V4", "AVX512_SKX", "AVX512_ICL", "AVX512_SPR")):
        raise RuntimeError("numpy dispatches AVX-512 ufuncs: it was imported before vlmlab.determinism.pin()")
    from vlmlab import cpu_gemm

    state["openblas"] = cpu_gemm.corename()
    if state["openblas"] != "haswell":
        raise RuntimeError(f"numpy's OpenBLAS runs {state['openblas']} kernels, not Haswell: numpy was imported "
                           "before vlmlab.determinism.pin() (OPENBLAS_CORETYPE is read when it loads)")
    if not cpu_gemm.installed():
        raise RuntimeError("CPU GEMMs are not routed to OpenBLAS: call vlmlab.determinism.pin()")
    if state["mkl_cbwr"] != MKL_CBWR_COMPATIBLE:
        raise RuntimeError(f"MKL's CNR branch is {state['mkl_cbwr']}, not COMPATIBLE ({MKL_CBWR_COMPATIBLE})")
    return state
