"""Captions/s of BLIP-2 re-captioning through Data-Juicer: the stock op, ours, and plain batched `generate`.

    python bench/synth_captioner.py --out bench_synth.json                        # blip2-opt-2.7b shapes, bf16, CUDA
    python bench/synth_captioner.py --smoke --images 4 --out /tmp/s.json          # CPU check of every path (1-layer model)

Rows, all with caption_num=3 candidates per image and 128 new tokens (random weights never finish a row
early, so every path decodes its full 128 steps, as the stock op's worst case; `steps` records it):
- `stock`: Data-Juicer 1.6.1's `image_captioning_mapper` (`process_batched` on `images` samples): one
  `model.generate(max_new_tokens=128, do_sample=True)` per candidate per sub-batch of `gpu_batch_size` images;
- `fast`: our `fast_image_captioning_mapper` (vlmlab/synth/ops/, loaded through Data-Juicer's
  custom-operator mechanism), same arguments: one static-cache decode per sub-batch, the Triton decode
  attention over the filled cache slots and one CUDA graph replay per step (`mode` says what ran);
  `fast_eager`: the same op with compile=false (eager steps, SDPA over the filled slots: the previous
  default); `fast_compiled`: compile=true (masked attention over the whole static cache, torch.compile);
  `fast_one_call`: the op with every sub-batch prepared in one processor call (before commit 088ca6f the first
  one too, which each op call waits for; now that one is processed in slices, one per preprocessing
  thread); a `fast` row records both preparations of one sub-batch, timed alone (`prepare_s`);
- `generate`: plain transformers `generate(num_return_sequences=3, max_new_tokens=128, do_sample=True)` on
  sub-batches of `gpu_batch_size` images (processor on the main thread): what batching alone gives.
GPU: a randomly initialised model with blip2-opt-2.7b's shapes (ViT-g 39 layers, Q-Former 12, OPT-2.7b,
32 queries, vocab 50272), bf16, saved to a temp folder and loaded from there exactly as the op loads
`Salesforce/blip2-opt-2.7b` (AutoProcessor + config.architectures[0]); its processor is saved as that folder's
`BlipImageProcessor`, which AutoProcessor loads torchvision-backed where torchvision is installed (the GPU
machine) and PIL-backed elsewhere (`image_processor` records which). Images are JPEG files on disk.
Each measurement is timed after a warm-up call of the same shapes (compilation and CUDA graph capture
are in the warm-up); `peak_gib` is torch's peak allocated memory during the timed call. The checks run
after the rows (one H100 run with them first timed our op at 217 captions/s, later runs without them
266-267; whether the checks or the host caused it was not found).
`--checks` adds two GPU checks: the decode-attention kernel against float32 attention and its time next to
SDPA's backends on one 2.7b layer's shapes (`attention`), and greedy (top_k=1) captions of the graph path
against the eager SDPA path on the same images (`greedy_agreement`: bf16 kernels round differently, so
near-ties may flip a token; a broken step would disagree from the first token on).
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
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` from a plain checkout


def opt27b_shaped(folder: Path, device: str, smoke: bool = False) -> None:
    """Save a random-init blip2-opt-2.7b-shaped model (bf16) + a Blip2Processor with OPT's id layout.

    `smoke`: the same code with 1-layer towers and a 1-layer OPT (CPU check of this path only)."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, OPTConfig)
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():  # the class a real blip2-opt-2.7b folder names
        from transformers.models.blip.image_processing_blip import BlipImageProcessor
    else:
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil as BlipImageProcessor

    from vlmlab.sim.teacher_tokenizer import build_tokenizer

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
        # bf16 on CUDA; the CPU smoke check in fp32 (bf16 matmuls crawl on a CPU without bf16 units)
        model = Blip2ForConditionalGeneration(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    words = [f"w{i}" for i in range(1000)]  # the ids matter (OPT's layout), not the words
    processor = Blip2Processor(BlipImageProcessor(size={"height": 224, "width": 224}), build_tokenizer(words),
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


STOCK, FAST = "image_captioning_mapper", "fast_image_captioning_mapper"


def write_jpegs(imgs: list[Image.Image], folder: Path) -> list[str]:
    paths = []
    for i, im in enumerate(imgs):
        paths.append(str(folder / f"{i}.jpg"))
        im.save(paths[-1], quality=90)
    return paths


def load_ops():
    """Data-Juicer's op registry, our op loaded the way a recipe's custom_operator_paths loads it."""
    stub_ray_if_missing()
    from data_juicer.config.config import load_custom_operators
    from data_juicer.ops.base_op import OPERATORS

    from vlmlab.synth.recipe import FAST_OP_FILE

    if FAST_OP_FILE.stem not in OPERATORS.modules:
        load_custom_operators([str(FAST_OP_FILE)])
    return OPERATORS.modules


def timed(fn):
    """(result, seconds, peak GiB allocated during the call)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None
    return result, seconds, peak


def through_op(name: str, folder: Path, paths: list[str], bs: int, caption_num: int, one_call: bool = False,
               **extra) -> dict:
    """One measurement of a Data-Juicer op (stock or ours) on `paths`, after a warm-up sub-batch;
    `one_call`: ours with every sub-batch prepared in one processor call."""
    from data_juicer.utils.model_utils import get_model

    cuda = torch.cuda.is_available()
    op = load_ops()[name](hf_img2seq=str(folder), caption_num=caption_num, keep_candidate_mode="all",
                          keep_original_sample=False, gpu_batch_size=bs, accelerator="cuda" if cuda else "cpu", **extra)
    if one_call:
        sliced = op._prepare
        op._prepare = lambda *args, slices=1: sliced(*args, slices=1)
    samples = {"text": ["<__dj__image>\nx <|__dj__eoc|>"] * len(paths), "images": [[p] for p in paths]}
    op.process_batched({k: v[:bs] for k, v in samples.items()})  # load; compile and capture the sub-batch shape
    torch.manual_seed(0)
    out, seconds, peak = timed(lambda: op.process_batched(samples))
    model = get_model(op.model_key, None, cuda)[0]
    row = {"seconds": seconds, "captions": len(out["text"]), "peak_gib": peak, "dtype": str(model.dtype)}
    if name == FAST:
        captioner = next(iter(sys.modules[type(op).__module__]._CAPTIONERS.values()))
        row.update(steps=captioner.last_steps, mode=captioner.mode, attention_config=captioner.attention_config,
                   candidates=captioner.candidates, redone_sub_batches=captioner.overflowed)
        if not one_call:
            row["prepare_s"] = time_prepare(op, paths[:bs], get_model(op.model_key, None, cuda)[1], cuda)
    return row


def time_prepare(op, paths: list[str], processor, pin: bool) -> dict:
    """Seconds to prepare one sub-batch in one processor call and in slices (one per thread), best of 3."""
    from concurrent.futures import ThreadPoolExecutor

    times = {}
    with ThreadPoolExecutor(op.preprocess_threads) as pool:
        for name, slices in (("one_call", 1), ("slices", op.preprocess_threads)):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                op._prepare(paths, None, processor, pool, pin, slices=slices)
                best = min(best, time.perf_counter() - t0)
            times[name] = round(best, 3)
    return times


def load_image(path: str) -> Image.Image:
    return Image.open(path).convert("RGB")  # as Data-Juicer's load_image, without importing Data-Juicer


def through_direct(folder: Path, paths: list[str], bs: int, caption_num: int, compile_) -> dict:
    """Our FastCaptioner without Data-Juicer (processor on the main thread, as the `generate` row):
    the fallback where Data-Juicer cannot be imported."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from vlmlab.synth.fast_captioner import FastCaptioner

    processor = AutoProcessor.from_pretrained(folder)
    arch = AutoConfig.from_pretrained(folder).architectures[0]
    model = getattr(transformers, arch).from_pretrained(folder, device_map="cuda").eval()
    model.config.image_token_index = 50265
    captioner = FastCaptioner(model, processor, caption_num, 128, compile=compile_)

    def run(chunk):
        return captioner.captions(processor(images=[load_image(p) for p in chunk], return_tensors="pt"))

    run(paths[:bs])
    torch.manual_seed(0)
    out, seconds, peak = timed(lambda: [c for i in range(0, len(paths), bs) for c in run(paths[i:i + bs])])
    row = {"seconds": seconds, "captions": sum(len(c) for c in out), "peak_gib": peak, "dtype": str(model.dtype),
           "steps": captioner.last_steps, "mode": captioner.mode, "attention_config": captioner.attention_config}
    del captioner, model
    return row


def through_generate(folder: Path, paths: list[str], bs: int, caption_num: int) -> dict:
    """Plain transformers: processor + generate(num_return_sequences=caption_num) per sub-batch of bs images."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = AutoProcessor.from_pretrained(folder)
    arch = AutoConfig.from_pretrained(folder).architectures[0]
    model = getattr(transformers, arch).from_pretrained(folder, device_map=device).eval()
    model.config.image_token_index = 50265
    steps = []

    def run(chunk):
        inputs = processor(images=[load_image(p) for p in chunk], return_tensors="pt").to(device)
        ids = model.generate(**inputs, max_new_tokens=128, do_sample=True, num_return_sequences=caption_num)
        steps.append(ids.shape[1] - model.config.num_query_tokens - 1)
        return processor.batch_decode(ids, skip_special_tokens=True)

    with torch.inference_mode():
        run(paths[:bs])
        torch.manual_seed(0)
        out, seconds, peak = timed(lambda: [c for i in range(0, len(paths), bs) for c in run(paths[i:i + bs])])
    del model
    return {"seconds": seconds, "captions": len(out), "peak_gib": peak, "dtype": "torch.bfloat16", "steps": steps[-1]}


def profile_fast(folder: Path, paths: list[str], bs: int, caption_num: int, out: Path) -> None:
    """torch.profiler over one sub-batch of our op (after a warm-up): where a decoding step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    op = load_ops()[FAST](hf_img2seq=str(folder), caption_num=caption_num, keep_candidate_mode="all",
                          keep_original_sample=False, gpu_batch_size=bs, accelerator="cuda")
    samples = {"text": ["<__dj__image>\nx <|__dj__eoc|>"] * bs, "images": [[p] for p in paths[:bs]]}
    op.process_batched(samples)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        op.process_batched(samples)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
    out.write_text(table + "\n")
    print(table)


def attention_check(rows: int = 1536, heads: int = 32, slots: int = 161, filled: int = 97, prompt: int = 33,
                    group: int = 3) -> dict:
    """The Triton decode attention vs float32 attention (max error) and vs SDPA's backends (ms per call)
    on one OPT-2.7b layer's decode shapes: `rows` rows, `filled` of `slots` cache slots."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vlmlab.synth import decode_attention as DA

    torch.manual_seed(0)
    d, dev = 80, "cuda"
    q = torch.randn(rows, 1, heads, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(rows, heads, slots, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    base = torch.arange(rows, device=dev) // group * group
    k[:, :, :prompt], v[:, :, :prompt] = k[base, :, :prompt], v[base, :, :prompt]  # candidates share the prompt
    length, scale = torch.tensor(filled, device=dev), d ** -0.5

    def ms(fn, repeats=20):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return round(start.elapsed_time(end) / repeats, 4)

    ref = DA.reference(q, k, v, filled, scale)
    out = {"shape": dict(rows=rows, heads=heads, slots=slots, filled=filled, prompt=prompt, group=group, head_dim=d)}
    for config in DA.CONFIGS:
        got = DA.decode_attention(q, k, v, length, scale, group, prompt, config)
        out[f"triton_{config[0]}x{config[1]}"] = {
            "ms": ms(lambda: DA.decode_attention(q, k, v, length, scale, group, prompt, config)),
            "max_abs_err": float((got.float() - ref.float()).abs().max())}
    out["triton_unshared_ms"] = ms(lambda: DA.decode_attention(q, k, v, length, scale, 1, 0))
    for name, backend in (("sdpa_default", None), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def call():
            return F.scaled_dot_product_attention(q, k[:, :, :filled], v[:, :, :filled], scale=scale)
        try:
            if backend is None:
                out[name + "_ms"] = ms(call)
            else:
                with sdpa_kernel(backend):
                    out[name + "_ms"] = ms(call)
        except Exception as e:  # noqa: BLE001 - a backend that refuses these shapes
            out[name + "_ms"] = f"{type(e).__name__}: {e}"[:200]
    gb = 2 * rows * heads * (filled - prompt + prompt / group) * d * 2 / 1e9
    out["triton_best_tb_per_s"] = round(gb / min(r["ms"] for key, r in out.items() if key.startswith("triton_")
                                                 and isinstance(r, dict)) / 1e-3 / 1e3, 2)
    return out


def greedy_agreement(folder: Path, paths: list[str], images: int = 32, caption_num: int = 3) -> dict:
    """Greedy captions (top_k=1) of the graph path and of the eager SDPA path on the same images."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from vlmlab.synth.fast_captioner import FastCaptioner

    processor = AutoProcessor.from_pretrained(folder)
    arch = AutoConfig.from_pretrained(folder).architectures[0]
    model = getattr(transformers, arch).from_pretrained(folder, device_map="cuda").eval()
    model.config.image_token_index = 50265
    inputs = processor(images=[load_image(p) for p in paths[:images]], return_tensors="pt")
    ids = {}
    for compile_ in ("auto", False):
        captioner = FastCaptioner(model, processor, caption_num, 128, compile=compile_)
        captioner.gc.top_k = 1
        torch.manual_seed(0)
        ids[compile_] = captioner.generate(**inputs)
        mode = captioner.mode if compile_ == "auto" else mode
        del captioner
    a, b = ids["auto"], ids[False]
    T = a.shape[1] - 128
    same = (a[:, T:] == b[:, T:]).int()
    first_diff = torch.where(same.all(1), same.shape[1], (1 - same).argmax(1))  # steps until the first differing token
    del model
    return {"rows": a.shape[0], "mode": mode, "rows_identical": float(same.all(1).float().mean()),
            "first_token_identical": float(same[:, 0].float().mean()),
            "mean_steps_before_first_difference": float(first_diff.float().mean())}


def free():
    import gc

    if "data_juicer.utils.model_utils" in sys.modules:
        sys.modules["data_juicer.utils.model_utils"].free_models()
    for name, module in list(sys.modules.items()):
        if name.endswith(FAST) and hasattr(module, "_CAPTIONERS"):
            module._CAPTIONERS.clear()
    torch._dynamo.reset()  # compiled graphs and their CUDA-graph memory pools
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stock", default="16,64", help="gpu_batch_size values for the stock op")
    ap.add_argument("--generate", default="64,128,256", help="images per plain generate call")
    ap.add_argument("--fast", default="64,256,512", help="gpu_batch_size values for our op")
    ap.add_argument("--fast-eager", default="256", help="gpu_batch_size values for our op with compile=false (eager SDPA steps)")
    ap.add_argument("--fast-one-call", default="", help="gpu_batch_size values for our op with every sub-batch "
                    "prepared in one processor call")
    ap.add_argument("--fast-compiled", default="",
                    help="gpu_batch_size values for our op with compile=true (whole-cache masked attention, torch.compile)")
    ap.add_argument("--direct", default="", help="gpu_batch_size values for our FastCaptioner without Data-Juicer "
                    "(compile=auto; `direct_eager`: --direct-eager, compile=false)")
    ap.add_argument("--direct-eager", default="")
    ap.add_argument("--checks", action="store_true", help="GPU checks: decode attention kernel, greedy agreement")
    ap.add_argument("--images", type=int, default=0, help="images per measurement (default: 2x its batch size)")
    ap.add_argument("--caption-num", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, help="also profile one sub-batch of our op at this gpu_batch_size")
    ap.add_argument("--smoke", action="store_true", help="CPU check of every path with 1-layer towers and LM")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available() and not a.smoke:
        sys.exit("error: the 2.7b-shaped benchmark needs CUDA; use --smoke on a CPU")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    what = "blip2-opt-2.7b shapes, random init, bf16" + (" (smoke: 1-layer towers and LM, fp32 on CPU)" if a.smoke else "")
    result = {"model": what, "device": device, "caption_num": a.caption_num, "max_new_tokens": 128,
              "torch": torch.__version__, "rows": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = [(path, int(bs)) for path, sizes in (("stock", a.stock), ("generate", a.generate), ("fast", a.fast),
                                                ("fast_eager", a.fast_eager), ("fast_one_call", a.fast_one_call),
                                                ("fast_compiled", a.fast_compiled),
                                                ("direct", a.direct), ("direct_eager", a.direct_eager))
            for bs in sizes.split(",") if bs]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "blip2-opt-2.7b-shaped"
        opt27b_shaped(folder, "cuda" if torch.cuda.is_available() else "cpu", smoke=a.smoke)
        from transformers import AutoProcessor

        result["image_processor"] = type(AutoProcessor.from_pretrained(folder).image_processor).__name__
        paths = write_jpegs(images(a.images or 2 * max([bs for _, bs in plan] + [a.profile])), Path(tmp))
        for k, (path, bs) in enumerate(plan):
            n = a.images or 2 * bs
            try:
                if path == "generate":
                    row = through_generate(folder, paths[:n], bs, a.caption_num)
                elif path.startswith("direct"):
                    row = through_direct(folder, paths[:n], bs, a.caption_num, False if path == "direct_eager" else "auto")
                else:
                    extra = {"fast_compiled": {"compile": True}, "fast_eager": {"compile": False},
                             "fast_one_call": {"one_call": True}}.get(path, {})
                    row = through_op(STOCK if path == "stock" else FAST, folder, paths[:n], bs, a.caption_num, **extra)
            except Exception as e:  # one failing row must not cost the others (one GPU call measures all)
                import traceback

                traceback.print_exc()
                result["rows"].append({"path": path, "gpu_batch_size": bs, "error": f"{type(e).__name__}: {e}"[:500]})
                free()
                continue
            row = {"path": path, "gpu_batch_size": bs, "rows_per_decode": bs * (1 if path == "stock" else a.caption_num),
                   "images": n, **row, "seconds": round(row["seconds"], 2),
                   "captions_per_s": round(row["captions"] / row["seconds"], 1)}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(result, indent=2) + "\n")  # after every row: a cut-off run keeps what it measured
            free()  # every row starts from an empty GPU: its peak is its own
        if a.checks and torch.cuda.is_available():
            try:
                result["attention"] = attention_check()
            except Exception as e:  # noqa: BLE001 - a check must not cost the measurements
                import traceback

                traceback.print_exc()
                result["attention"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print("attention:", json.dumps(result["attention"]), flush=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            free()
            try:
                result["greedy_agreement"] = greedy_agreement(folder, paths)
            except Exception as e:  # noqa: BLE001 - a check must not cost the measurements
                result["greedy_agreement"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print("greedy agreement:", json.dumps(result["greedy_agreement"]), flush=True)
            free()
        if a.profile:
            try:
                profile_fast(folder, paths, a.profile, a.caption_num, out.with_suffix(".profile.txt"))
            except Exception:  # noqa: BLE001 - the profile must not cost the summary
                import traceback

                traceback.print_exc()
    best = {p: max((r["captions_per_s"] for r in result["rows"] if r["path"] == p and "error" not in r), default=None)
            for p in ("stock", "generate", "fast", "fast_eager", "fast_one_call", "direct", "direct_eager")}
    result["best_captions_per_s"] = best
    if best["fast"] and best["stock"] and best["generate"]:
        result["fast_vs_stock"] = round(best["fast"] / best["stock"], 1)
        result["fast_vs_generate"] = round(best["fast"] / best["generate"], 1)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{what} on {device}, caption_num={a.caption_num}, 128 new tokens")
    print(f"{'path':>9} {'batch':>6} {'rows':>5} {'images':>7} {'seconds':>8} {'captions/s':>11} {'peak GiB':>9} steps")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['path']:>9} {r['gpu_batch_size']:>6} error: {r['error'][:200]}")
            continue
        print(f"{r['path']:>9} {r['gpu_batch_size']:>6} {r['rows_per_decode']:>5} {r['images']:>7} {r['seconds']:>8} "
              f"{r['captions_per_s']:>11} {str(r['peak_gib']):>9} {r.get('steps')} {r.get('mode', '')}")
    print("best:", best, {k: result[k] for k in ("fast_vs_stock", "fast_vs_generate") if k in result})


if __name__ == "__main__":
    main()
