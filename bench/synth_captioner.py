"""Images/s of BLIP-2 captioning as Data-Juicer's image_captioning_mapper runs it, for several gpu_batch_size.

    python bench/synth_captioner.py --out bench_synth.json                      # blip2-opt-2.7b shapes, bf16, CUDA
    python bench/synth_captioner.py --tiny --teacher models/teacher --out /tmp/s.json   # CPU: the tiny teacher
    python bench/synth_captioner.py --smoke --batch-sizes 2 --images 2 --out /tmp/s.json  # CPU check of the GPU path

GPU: a randomly initialised model with blip2-opt-2.7b's shapes (ViT-g 39 layers, Q-Former 12, OPT-2.7b,
32 queries, vocab 50272), bf16, saved to a temp folder and loaded from there exactly as the op loads
`Salesforce/blip2-opt-2.7b` (AutoProcessor + config.architectures[0]). Random weights never emit EOS,
so every caption runs the op's full `max_new_tokens=128`: the op's worst case, which a trained model
reaches only on a batch whose longest caption is 128 tokens.
Where Data-Juicer is installed the op itself runs (`process_batched`, caption_num captions per image);
otherwise (the GPU machine has no Data-Juicer) the op's exact call sequence: processor on a sub-batch of
`gpu_batch_size` images -> `generate(max_new_tokens=128, do_sample=True)` -> batch_decode. The JSON says which.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` from a plain checkout


def opt27b_shaped(folder: Path, device: str, smoke: bool = False) -> None:
    """Save a random-init blip2-opt-2.7b-shaped model (bf16) + a Blip2Processor with OPT's id layout.

    `smoke`: the same code with 1-layer towers and a 1-layer OPT (CPU check of this path only)."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, OPTConfig)
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from vlmlab.synth.tokenizer import build_tokenizer

    layers = (1, 1, 1) if smoke else (39, 12, 32)  # ViT-g, Q-Former, OPT-2.7b
    vision = Blip2VisionConfig(num_hidden_layers=layers[0])  # defaults: blip2-opt-2.7b's ViT-g/14 at 224 px
    qformer = Blip2QFormerConfig(num_hidden_layers=layers[1])
    text = OPTConfig(vocab_size=50272, hidden_size=2560, num_hidden_layers=layers[2], ffn_dim=10240,
                     num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560, pad_token_id=1,
                     bos_token_id=2, eos_token_id=2)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=32, image_token_index=50265)
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    words = [f"w{i}" for i in range(1000)]  # the ids matter (OPT's layout), not the words
    processor = Blip2Processor(BlipImageProcessorPil(size={"height": 224, "width": 224}), build_tokenizer(words),
                               num_query_tokens=32)
    processor.save_pretrained(folder)
    del model


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (336, 448, 3), dtype=np.uint8)) for _ in range(n)]


def stub_ray_if_missing() -> bool:
    """Let `data_juicer.core` import where ray is absent (the GPU machine: its 79 MB wheel is over
    what can be carried there). Data-Juicer imports ray only for its Ray executor, which this
    bench never uses; every name of the stub is an inert placeholder, so the op itself runs unchanged."""
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import types

    if importlib.util.find_spec("ray") is not None:
        return False

    class Inert(type):  # a class for `class X(ray.data.Datasource)`, a pass-through for `@ray.remote`
        def __call__(cls, *args, **kwargs):
            return args[0] if len(args) == 1 and not kwargs and callable(args[0]) else cls

        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Inert(name, (), {})

    class StubModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Inert(name, (), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = StubModule(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())
    return True


def through_op(folder: Path, imgs: list[Image.Image], gpu_batch_size: int, caption_num: int, trust: bool):
    """Data-Juicer's op if importable, else its call sequence. Returns (seconds, captions, path)."""
    stub_ray_if_missing()
    try:
        from data_juicer.ops.mapper.image_captioning_mapper import ImageCaptioningMapper
    except ImportError:
        ImageCaptioningMapper = None
    if ImageCaptioningMapper is not None:
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, im in enumerate(imgs):
                paths.append(f"{tmp}/{i}.jpg")
                im.save(paths[-1])
            op = ImageCaptioningMapper(hf_img2seq=str(folder), trust_remote_code=trust, caption_num=caption_num,
                                       keep_candidate_mode="all", keep_original_sample=False,
                                       gpu_batch_size=gpu_batch_size, accelerator="cuda" if torch.cuda.is_available() else "cpu")
            samples = {"text": ["<__dj__image>\nx <|__dj__eoc|>"] * len(paths), "images": [[p] for p in paths]}
            op.process_batched({k: v[:1] for k, v in samples.items()})  # load the model, warm up
            from data_juicer.utils.model_utils import get_model

            dtype = str(get_model(op.model_key, None, op.use_cuda())[0].dtype)
            _sync()
            t0 = time.perf_counter()
            out = op.process_batched(samples)
            _sync()
            return time.perf_counter() - t0, len(out["text"]), f"data_juicer.image_captioning_mapper ({dtype})"
    from transformers import AutoConfig, AutoProcessor

    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust)
    arch = AutoConfig.from_pretrained(folder).architectures[0]
    # no dtype argument, as the op: transformers takes the checkpoint's (bf16 here); the table reports it
    model = getattr(transformers, arch).from_pretrained(folder, trust_remote_code=trust, device_map=device).eval()
    model.config.image_token_index = 50265  # as the op does on every call

    def run(batch):
        inputs = processor(images=batch, return_tensors="pt").to(model.device)
        ids = model.generate(**inputs, max_new_tokens=128, do_sample=True)
        return processor.batch_decode(ids, skip_special_tokens=True)

    with torch.no_grad():
        run(imgs[:gpu_batch_size])  # warm-up
        _sync()
        t0 = time.perf_counter()
        n = 0
        for _ in range(caption_num):
            for i in range(0, len(imgs), gpu_batch_size):
                n += len(run(imgs[i: i + gpu_batch_size]))
        _sync()
    return time.perf_counter() - t0, n, f"op call sequence, data_juicer not installed ({model.dtype})"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU: the tiny teacher folder instead of a 2.7b-shaped model")
    ap.add_argument("--teacher", default="models/teacher", help="with --tiny: the teacher folder")
    ap.add_argument("--batch-sizes", default="", help="gpu_batch_size values (default: 8,16,32,64 GPU; 32,128 tiny)")
    ap.add_argument("--images", type=int, default=0, help="images per measurement (default: 4x the largest batch)")
    ap.add_argument("--caption-num", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (tiny)")
    ap.add_argument("--smoke", action="store_true", help="CPU check of the 2.7b path with 1-layer towers and LM")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sizes = [int(s) for s in (a.batch_sizes or ("32,128" if a.tiny else "8,16,32,64")).split(",")]
    n = a.images or 4 * max(sizes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.tiny:
            folder, trust, what = Path(a.teacher), True, f"tiny teacher {a.teacher}"
            if not (folder / "config.json").is_file():
                sys.exit(f"error: {folder} has no teacher; run `dvc repro teacher` or pass --teacher")
        else:
            if not torch.cuda.is_available() and not a.smoke:
                sys.exit("error: the 2.7b-shaped benchmark needs CUDA; use --tiny (or --smoke) on a CPU")
            folder, trust = Path(tmp) / "blip2-opt-2.7b-shaped", False
            what = "blip2-opt-2.7b shapes, random init, bf16" + (" (smoke: 1-layer towers and LM)" if a.smoke else "")
            opt27b_shaped(folder, "cuda" if torch.cuda.is_available() else "cpu", smoke=a.smoke)
        imgs = images(n)
        for bs in sizes:
            seconds, captions, path = through_op(folder, imgs, bs, a.caption_num, trust)
            rows.append({"gpu_batch_size": bs, "images": n * a.caption_num, "captions": captions,
                         "seconds": round(seconds, 2), "images_per_s": round(n * a.caption_num / seconds, 2),
                         "path": path})
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{a.threads} threads"
    print(f"{what} on {device}, caption_num={a.caption_num}")
    print(f"{'gpu_batch_size':>15} {'images':>7} {'seconds':>8} {'images/s':>9}  path")
    for r in rows:
        print(f"{r['gpu_batch_size']:>15} {r['images']:>7} {r['seconds']:>8} {r['images_per_s']:>9}  {r['path']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": what, "device": device, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
