"""Why zoo/teacher weights differ between x86 machines: small real trainings, hashed, per forced setting.

    # hashes of a few steps of each training the zoo and teacher stages run (real code, small sizes)
    python bench/determinism.py hashes [--pin] [--steps 20]
    # per-op trace of one training step: (op, input hash, output hash), to diff two settings
    python bench/determinism.py trace --part lm --out trace.json [--pin]
    python bench/determinism.py diff a.json b.json     # ops whose inputs agree but outputs differ

Run it under forced settings from outside, e.g.
    ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE python bench/determinism.py hashes
--pin calls vlmlab.determinism.pin() first (as the stages do), so outside settings should stop mattering.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if "--pin" in sys.argv:  # before torch loads: MKL reads MKL_CBWR when it initialises
    from vlmlab import determinism

    determinism.pin()

import numpy as np  # noqa: E402
import torch  # noqa: E402


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def state_hash(module: torch.nn.Module) -> str:
    sd = module.state_dict()
    return digest(sd[k] for k in sorted(sd))


def lm_part(steps: int):
    from vlmlab.models import presets
    from vlmlab.sim import pretrain as zoo
    from vlmlab.sim.lm_tokenizer import train_world_tokenizer
    from vlmlab.sim import text, world

    texts = world.world_text_corpus(600, 300)
    tok = train_world_tokenizer(texts, text.world_words())
    cfg = presets.build_config("tiny", vocab_size=len(tok), image_token_id=4, pad_token_id=tok.pad_token_id)
    cfg.text_config._attn_implementation = "sdpa"
    model, _ = zoo.pretrain_lm(cfg.text_config, tok, texts, texts[:64],
                               zoo.LoopConfig(steps=steps, batch_size=32, lr=3e-3, seed=301))
    return model


def tower_part(kind: str, steps: int):
    from vlmlab.models import presets
    from vlmlab.sim import pretrain as zoo

    cfg = presets.build_config("tiny", vocab_size=64, image_token_id=4)
    cfg.vision_config._attn_implementation = "sdpa"
    tower_cfg, size = ((cfg.vision_config, cfg.image_size) if kind == "vit"
                       else (cfg.vision_aux_config, cfg.image_size_aux))
    train = zoo.labelled_scenes(256, 302, size, cfg.image_size_aux)
    val = zoo.labelled_scenes(32, 303, size, cfg.image_size_aux)
    tower, _ = zoo.pretrain_tower(tower_cfg, cfg, zoo.tower_targets(), train, val,
                                  zoo.LoopConfig(steps=steps, batch_size=64, lr=3e-3, seed=304), kind)
    return tower


def teacher_part(steps: int):
    from vlmlab.sim import teacher
    from vlmlab.sim.text import world_words
    from vlmlab.sim import text
    from vlmlab.sim.scene import render, sample_scene

    images, captions = [], []
    for i in range(64):
        rng = np.random.default_rng([350, 7, i])
        scene = sample_scene(rng)
        images.append(render(scene, 96))
        captions.append(text.dense_caption(scene, rng))
    cfg = teacher.TeacherConfig(epochs=max(1, steps // 2), batch_size=32, max_words=60, encoder_images=0)
    torch.manual_seed(350)
    model, processor = teacher.build_teacher(cfg, world_words())
    teacher.train_teacher(model, processor, images, captions, cfg, seed=350)
    return model


PARTS = {"lm": lm_part, "vit": lambda s: tower_part("vit", s), "convnext": lambda s: tower_part("convnext", s),
         "teacher": teacher_part}


def setting() -> dict:
    keys = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA")
    return {"env": {k: os.environ[k] for k in keys if k in os.environ}, "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "mkldnn": torch.backends.mkldnn.enabled,
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def hashes(steps: int = 20, parts: str = "lm,vit,convnext,teacher", pin: bool = False, threads: int = 0,
           mkldnn: int = -1, deterministic: int = -1) -> None:
    if threads:
        torch.set_num_threads(threads)
    if mkldnn >= 0:
        torch.backends.mkldnn.enabled = bool(mkldnn)
    if deterministic >= 0:
        torch.use_deterministic_algorithms(bool(deterministic))
    out = {"setting": setting()}
    for name in parts.split(","):
        t0, c0 = time.perf_counter(), time.process_time()
        out[name] = state_hash(PARTS[name](steps))
        out[f"{name}_s"] = round(time.perf_counter() - t0, 2)
        out[f"{name}_cpu_s"] = round(time.process_time() - c0, 2)  # CPU time: fairer than wall on a shared box
    print(json.dumps(out))


def trace(part: str, out: str, steps: int = 1, pin: bool = False, threads: int = 0, mkldnn: int = -1) -> None:
    """Every aten op of `steps` training steps: name, input digest, output digest."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    if threads:
        torch.set_num_threads(threads)
    if mkldnn >= 0:
        torch.backends.mkldnn.enabled = bool(mkldnn)
    rows = []

    def tensors(x):
        return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor) and t.layout == torch.strided]

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            r = func(*args, **(kwargs or {}))
            ins, outs = tensors((args, kwargs)), tensors(r)
            if outs and all(t.dtype.is_floating_point for t in outs):
                shapes = [tuple(t.shape) for t in ins]
                rows.append([str(func), digest(ins), digest(outs), str(shapes)[:120]])
            return r

    with Record():
        PARTS[part](steps)
    Path(out).write_text(json.dumps({"setting": setting(), "ops": rows}))
    print(f"{len(rows)} ops -> {out}")


def diff(a: str, b: str, show: int = 30) -> None:
    """Ops with equal inputs and different outputs: the kernels that differ between the two settings."""
    A, B = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    culprits: dict[str, int] = {}
    first = None
    for i, (x, y) in enumerate(zip(A["ops"], B["ops"])):
        if x[0] != y[0]:
            print(f"op sequences diverge at {i}: {x[0]} vs {y[0]}")
            break
        if x[2] != y[2] and first is None:
            first = (i, x)
        if x[1] == y[1] and x[2] != y[2]:
            key = f"{x[0]} {x[3]}"
            culprits[key] = culprits.get(key, 0) + 1
    print(f"{len(A['ops'])} vs {len(B['ops'])} ops; first differing output: {first}")
    for k, n in sorted(culprits.items(), key=lambda kv: -kv[1])[:show]:
        print(f"{n:5d}  {k}")


if __name__ == "__main__":
    import fire

    argv = [a for a in sys.argv[1:] if a != "--pin"]
    fire.Fire({"hashes": hashes, "trace": trace, "diff": diff}, command=argv)
