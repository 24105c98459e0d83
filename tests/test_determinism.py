"""vlmlab.determinism.pin(): a real training gives the same weights whatever kernels the machine would pick.

Each setting forces, from outside, what differs between x86 machines: ATen's kernel ISA, MKL's code
path, oneDNN's ISA, thread counts. Without the pins the weights differ (checked here too, so the
equality is not vacuous); with them they are identical.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# a few AdamW steps of the zoo's ViT tower (conv patch embedding, SDPA attention, layer norms, GELU,
# linear heads, cross-entropy): the ops whose kernels differ by ISA, MKL branch and oneDNN
TRAIN = """
import sys
if sys.argv[1] == "pin":
    from vlmlab.determinism import pin
    pin()
import hashlib, torch
from vlmlab.models import presets
from vlmlab.sim import pretrain as zoo
cfg = presets.build_config("tiny", vocab_size=64, image_token_id=4)
data = zoo.labelled_scenes(64, 7, cfg.image_size, cfg.image_size_aux)
tower, _ = zoo.pretrain_tower(cfg.vision_config, cfg, {"count": 3, "sign_side": 2}, data, data,
                              zoo.LoopConfig(steps=4, batch_size=32, seed=7), "test")
sd = tower.state_dict()
print(hashlib.sha256(b"".join(sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest())
"""

# what another x86 machine would pick on its own, forced here: ATen's scalar kernels instead of AVX2,
# oneDNN's SSE4.1 JIT, MKL asked for its AVX2 branch (Intel's; on AMD it stays on AUTO), two threads
FORCED = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "AVX2",
          "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def weights_hashes(mode: str) -> tuple[str, str]:
    """(this machine's own choice, FORCED) weights hashes, the two trainings run side by side."""
    clean = {k: v for k, v in os.environ.items() if k not in FORCED}
    procs = [subprocess.Popen([sys.executable, "-c", TRAIN, mode], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**clean, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", **env})
             for env in ({}, FORCED)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
        out.append(stdout.strip().splitlines()[-1])
    return out[0], out[1]


@pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="forcing kernel ISAs needs an AVX2 CPU")
def test_pinned_training_is_bitwise_under_forced_kernels():
    own, forced = weights_hashes("free")
    assert own != forced  # the forced setting really changes the kernels, else the next check proves nothing
    own, forced = weights_hashes("pin")
    assert own == forced


def test_pin_refuses_kernels_chosen_before_it():
    code = ("import torch; torch.ones(4).sum()\n"  # the first dispatch fixes the ISA (DEFAULT here)
            "from vlmlab.determinism import pin; pin()")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO), "ATEN_CPU_CAPABILITY": "default"}, timeout=120)
    assert r.returncode != 0 and "ran before vlmlab.determinism.pin()" in r.stderr, r.stderr[-1000:]


def stage_scripts() -> list[Path]:
    """The scripts dvc.yaml runs (stages/sweep.py drives `dvc exp` and runs no tensor op)."""
    cmds = [s.get("do", s)["cmd"] for s in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()]
    return sorted({REPO / w for c in cmds for w in c.split() if w.startswith("stages/") and w.endswith(".py")})


@pytest.mark.parametrize("script", stage_scripts(), ids=lambda p: p.name)
def test_every_stage_pins_before_anything_else_loads(script):
    """pin() must come before any import that could run a tensor op (only os, sys, pathlib and __future__ may precede
    it: the sys.path bootstrap that makes a stage import its own checkout)."""
    import ast

    bootstrapped = False  # vlmlab is not installed: the script must put its own checkout on sys.path first
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module == "vlmlab.determinism":
            assert bootstrapped, f"{script.name}: imports vlmlab before its sys.path.insert(0, <checkout>)"
            return
        bootstrapped |= isinstance(node, ast.Expr) and "sys.path.insert(0" in ast.unparse(node)
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) else [])
        assert not names or set(names) <= {"os", "sys", "pathlib", "__future__"}, f"{script.name}: {names} imported before pin()"
    pytest.fail(f"{script.name}: no `from vlmlab.determinism import pin; pin()`")


# float64 exp/log (CIDEr's idf, bootstrap), float32 power: numpy's AVX-512 loops round differently from its AVX2 ones
NUMPY = """
import sys
if sys.argv[1] == "pin":
    from vlmlab.determinism import pin
    pin()
import hashlib, numpy as np
x = np.abs(np.random.default_rng(0).standard_normal(100_000)) * 3
print(hashlib.sha256(b"".join(f(x).tobytes() for f in (np.exp, np.log, np.log1p, np.expm1))).hexdigest())
"""


def avx512() -> bool:
    """The CPU's AVX-512 (numpy's X86_V4 level): read off features, which numpy reports also while its dispatch is capped."""
    from numpy._core._multiarray_umath import __cpu_features__ as features

    return all(features.get(f) for f in ("AVX512F", "AVX512CD", "AVX512VL", "AVX512BW", "AVX512DQ"))


def numpy_hash(mode: str, **env) -> str:
    r = subprocess.run([sys.executable, "-c", NUMPY, mode], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**{k: v for k, v in os.environ.items() if k != "NPY_ENABLE_CPU_FEATURES"},
                            "PYTHONPATH": str(REPO), **env})
    assert r.returncode == 0, r.stderr[-1000:]
    return r.stdout.strip()


def test_pin_caps_numpy_at_avx2():
    """An AVX-512 machine's own numpy loops differ from an AVX2 machine's (forced here); pinned, it runs the AVX2 ones."""
    avx2 = numpy_hash("free", NPY_ENABLE_CPU_FEATURES="X86_V3")
    if avx512():
        assert numpy_hash("free") != avx2  # else the next check proves nothing
    assert numpy_hash("pin") == avx2
    # a user's own NPY_DISABLE_CPU_FEATURES: numpy refuses it together with ENABLE; pin() drops it
    assert numpy_hash("pin", NPY_DISABLE_CPU_FEATURES="AVX512_SKX") == avx2


@pytest.mark.skipif(not avx512(), reason="numpy loaded first dispatches AVX-512 loops only on an AVX-512 CPU")
def test_pin_refuses_numpy_loaded_before_it():
    code = "import numpy\nfrom vlmlab.determinism import pin; pin()"
    env = {k: v for k, v in os.environ.items() if k != "NPY_ENABLE_CPU_FEATURES"}  # conftest's pin() set it here
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**env, "PYTHONPATH": str(REPO)})
    assert r.returncode != 0 and "imported before vlmlab.determinism.pin()" in r.stderr, r.stderr[-1000:]


def test_relax_cuda_leaves_a_cpu_host_pinned():
    # train.cuda_deterministic: false relaxes the GPU half of pin() on CUDA hosts only: a CPU run (the
    # tiny world, CI) keeps deterministic algorithms and cuBLAS's setting, so its outputs stay bit for bit
    code = ("from vlmlab.determinism import pin, relax_cuda; pin(); import os, torch; "
            "print(relax_cuda(), torch.are_deterministic_algorithms_enabled(), os.environ.get('CUBLAS_WORKSPACE_CONFIG'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-1000:]
    assert r.stdout.split() == ["False", "True", ":4096:8"], r.stdout


def test_no_vml_catches_what_follows_the_cpu_vendor_and_lets_the_stages_ops_through():
    """MKL's VML (exp, sqrt, pow 0.5, the per-tensor AdamW) picks its code path by CPU vendor, which no pin
    reaches: the guard the pipeline test runs every stage under must catch those and pass what the stages use."""
    from vlmlab.determinism import no_vml
    from vlmlab.models import presets
    from vlmlab.models.mgm import aten_gelu
    from transformers import AutoModelForCausalLM

    x = torch.rand(8) + 0.5
    p = torch.nn.Parameter(torch.ones(8))
    p.grad = torch.ones(8)
    with no_vml():
        for op in (torch.exp, torch.sqrt, torch.erf, lambda v: v.pow(0.5), lambda v: torch._foreach_sqrt([v])):
            with pytest.raises(RuntimeError, match="VML"):
                op(x)
        with pytest.raises(RuntimeError, match="VML"):
            torch.optim.AdamW([p], lr=1e-3, foreach=False).step()
        torch.optim.AdamW([p], lr=1e-3, fused=True).step()          # the stages' optimizer
        torch.nn.functional.gelu(x), x.rsqrt(), x.softmax(0)
        cfg = presets.build_config("tiny", vocab_size=32, image_token_id=4)
        lm = AutoModelForCausalLM.from_config(cfg.text_config)
        with pytest.raises(RuntimeError, match="VML"):              # gelu_python's torch.erf
            lm(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        aten_gelu(lm)(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()


def test_aten_gelu_is_the_same_exact_gelu():
    from vlmlab.models import presets
    from vlmlab.models.mgm import aten_gelu
    from transformers import AutoModelForCausalLM

    cfg = presets.build_config("tiny", vocab_size=32, image_token_id=4)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg.text_config)
    ids = torch.tensor([[1, 2, 3, 4]])
    before = lm(input_ids=ids).logits
    after = aten_gelu(lm)(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_pin_turns_the_guard_on_from_the_environment():
    code = "from vlmlab.determinism import pin; pin(); import torch; torch.ones(3).exp()"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLMLAB_NO_VML": "1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "VML" in p.stderr
    env["VLMLAB_NO_VML"] = "0"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
