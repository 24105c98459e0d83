"""TextVQA-style questions/s: a batch-1 `model.generate` loop (as MGM's model_vqa_loader)
against vlmlab's batched greedy path, side by side in one run, same model, same prompts.

    python bench/generate.py --out bench_generate.json                 # mgm-2b, random init, bf16, CUDA
    python bench/generate.py --preset tiny --n 16 --n-batch1 4 --batch-size 8 --out /tmp/g.json   # CPU smoke

Questions share images as in TextVQA val (5000 questions on 3166 images, 1.58 per image),
in shuffled order. Both paths get images already pre-processed and staged on the GPU (MGM's
loader prefetches them in DataLoader workers, so preprocessing is off the GPU's critical
path there too; its CPU cost is reported separately) and generate exactly
`--max-new-tokens` tokens: the weights are random, so stopping early would make the two
paths do different work.
The batched path (vlmlab.evaluate.generate): prompts grouped by image, one prefix
(image features + KV) per image, suffixes sorted by length, then a static KV cache with
the decode step compiled (CUDA graphs) on CUDA. It is also timed without prefix sharing,
and `--breakdown` times its parts (synchronising around each, so a separate pass).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/generate.py` from a plain checkout
from vlmlab.evaluate.generate import GreedyDecoder, generate_answers, static_cache_len
from vlmlab.models import presets
from vlmlab.models.mgm import MgmForConditionalGeneration
from vlmlab.models.processor import MgmProcessor
from vlmlab.sim.lm_tokenizer import train_world_tokenizer
from vlmlab.sim.text import SHORT_ANSWER as TEXTVQA_SUFFIX  # as MGM/LLaVA ask TextVQA

TEXTVQA_QUESTIONS, TEXTVQA_IMAGES = 5000, 3166  # TextVQA 0.5.1 val
QUESTIONS = ["what is the brand of this camera", "what does the small white text spell", "what kind of beer is this",
             "what brand liquor is on the right", "how long has the drink on the right been aged",
             "what number is on the player's jersey", "what is written on the sign", "what time is shown",
             "who is the author of this book", "what is the name of the store"]
OCR = "dakota digital single use camera stone ale sublimely self righteous bowmore islay whisky scotch malt " \
      "copenhagen drupalcon coca cola 10 years 2015 open sale stop exit main street book store the new york times"


def build(preset: str, device: str, dtype: torch.dtype, attn: str):
    """A random-init MGM of `preset` shapes with a word-level tokenizer (no downloads)."""
    tok = train_world_tokenizer([" ".join(QUESTIONS), OCR, TEXTVQA_SUFFIX, "Reference OCR token:"])
    kw = {"image_token_id": len(tok), "pad_token_id": tok.pad_token_id,  # the processor appends <image> there
          "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "attn_implementation": attn}
    if preset == "tiny":
        kw["vocab_size"] = len(tok)  # mgm-2b keeps Gemma's 256000 rows: the LM head's real cost
    config = presets.build_config(preset, **kw)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 3B-parameter CPU init takes minutes
        model = MgmForConditionalGeneration(config)
    model = model.to(dtype).eval()
    return model, MgmProcessor.for_model(tok, config)


def textvqa_items(n: int, image_side: int, seed: int = 0) -> list[dict]:
    """LLaVA TextVQA prompts ("<q>\\nReference OCR token: ...\\n<suffix>") with varied lengths,
    on random 4:3 images shared as in TextVQA val (1.58 questions per image), shuffled."""
    rng = np.random.default_rng(seed)
    words = OCR.split()
    n_images = max(1, round(n * TEXTVQA_IMAGES / TEXTVQA_QUESTIONS))
    pool = [Image.fromarray(rng.integers(0, 255, (image_side, image_side * 4 // 3, 3), dtype=np.uint8))
            for _ in range(n_images)]
    items = []
    for i in range(n):
        ocr = ", ".join(rng.choice(words, size=int(rng.integers(0, 25))))
        q = QUESTIONS[i % len(QUESTIONS)].capitalize() + "?"
        prompt = f"{q}\nReference OCR token: {ocr}\n{TEXTVQA_SUFFIX}" if ocr else f"{q}\n{TEXTVQA_SUFFIX}"
        items.append({"prompt": prompt, "image": pool[i * n_images // n]})
    return [items[i] for i in rng.permutation(n)]


def encode(proc, items, device: str = "cpu", dtype=torch.float32) -> tuple[list[dict], float]:
    """Pre-process every item; each distinct image once, its views kept on `device` in `dtype`
    and shared by its questions (TextVQA's 3166 val images take 13 GB in bf16 (4.2 MB each): they fit).
    Returns the items and the CPU preprocessing rate in images/s."""
    views, t_images = {}, 0.0
    encoded = []
    for it in items:
        key = id(it["image"])
        if key not in views:
            t0 = time.perf_counter()
            views[key] = proc.images(it["image"])
            t_images += time.perf_counter() - t0
            views[key] = {k: v.to(device, dtype) for k, v in views[key].items()}
        encoded.append({"input_ids": proc.prompt_ids(it["prompt"], with_image=True), **views[key]})
    return encoded, len(views) / t_images


def unshared(encoded: list[dict]) -> list[dict]:
    """The same items with each image a distinct tensor object (same storage): no prefix sharing."""
    return [{**e, "pixel_values": e["pixel_values"].view_as(e["pixel_values"])} for e in encoded]


def breakdown(proc, encoded, kw, device) -> dict[str, float]:
    """Seconds in each part of the batched path over `encoded`, synchronising around each part."""
    spent: dict[str, float] = {}
    patched = []

    def timed(obj, name, label):
        fn = getattr(obj, name)
        patched.append((obj, name, obj.__dict__.get(name)))

        def wrapper(*a, **k):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync(device)
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
            return out
        setattr(obj, name, wrapper)

    decoder = kw["decoder"]
    mgm = decoder.mgm
    towers = ("vision_clip", "vision_convnext", "vision_mining")
    if decoder._features == mgm.get_image_features:  # compiled towers run as one graph: not timed apart
        for name, label in zip(("encode_low_res", "encode_high_res", "mine_patches"), towers):
            timed(mgm, name, label)
    timed(decoder, "prefill", "prefix_total")
    timed(decoder, "_step", "decode_steps")
    timed(decoder, "decode", "total")  # suffix prefill, prefix copy-in and the steps
    try:
        generate_answers(None, proc, encoded, **kw)
    finally:
        for obj, name, before in patched:  # back to the class's method / the compiled step
            if before is None:
                delattr(obj, name)
            else:
                setattr(obj, name, before)
    parts = {k: round(v, 3) for k, v in spent.items()}
    if towers[0] in spent:  # projector and embedding included
        parts["prefix_lm"] = round(spent["prefix_total"] - sum(spent[t] for t in towers), 3)
    parts["suffix_prefill_and_rest"] = round(spent["total"] - spent["decode_steps"], 3)  # decode() minus its steps
    parts["prefill_plus_decode"] = round(spent["prefix_total"] + spent["total"], 3)
    return parts


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gb(device: str) -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else 0.0


def batch1_loop(model, proc, encoded, max_new_tokens, device) -> tuple[list[str], float]:
    """MGM's model_vqa_loader: one question at a time through `model.generate` with its KV cache."""
    answers = []
    sync(device)
    t0 = time.perf_counter()
    for e in encoded:
        ids = e["input_ids"][None].to(device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 pixel_values=e["pixel_values"][None].to(device, model.dtype),
                                 pixel_values_aux=e["pixel_values_aux"][None].to(device, model.dtype),
                                 do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, use_cache=True, pad_token_id=proc.tokenizer.pad_token_id)
        answers.append(proc.decode(out[0, ids.shape[1]:]))
    sync(device)
    return answers, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mgm-2b", choices=list(presets.PRESETS))
    ap.add_argument("--n", type=int, default=1024, help="questions for the batched path (a multiple of --batch-size)")
    ap.add_argument("--n-batch1", type=int, default=64, help="questions for the batch-1 loop (slow)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--prefix-batch", type=int, default=32, help="images (prefixes) per tower call and prefix prefill")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of each batched path (median reported)")
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--no-compile", action="store_true", help="static cache without torch.compile/CUDA graphs")
    ap.add_argument("--compile-decode-only", action="store_true", help="compile the decode step, not the prefill")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its conv algorithms (both paths)")
    ap.add_argument("--breakdown", action="store_true", help="one more pass timing each part of the batched path")
    ap.add_argument("--out", required=True, help="JSON file for the numbers")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
    model, proc = build(args.preset, device, dtype, args.attn)
    items = textvqa_items(max(args.n, args.n_batch1), proc.image_size_aux)

    encoded, preprocess_ips = encode(proc, items, device, dtype)  # both paths read the same staged images
    prompt_tokens = float(np.mean([len(e["input_ids"]) for e in encoded]))

    # warm-up (and compile) on one batch, outside the timing; a compile that fails falls back a level
    cache_len = static_cache_len([e["input_ids"] for e in encoded], model.config.image_token_id,
                                 args.max_new_tokens)  # one shape for every batch
    levels = ["none"] if device != "cuda" or args.no_compile else \
        (["decode", "none"] if args.compile_decode_only else ["all", "decode", "none"])
    compile_error = ""
    t0 = time.perf_counter()
    for level in levels:
        decoder = GreedyDecoder(model, [], proc.tokenizer.pad_token_id, args.max_new_tokens, cache="static",
                                compile={"all": True, "decode": "decode", "none": False}[level],
                                prefix_batch=args.prefix_batch)  # [] : never stop early
        kw = dict(batch_size=args.batch_size, decoder=decoder, cache_len=cache_len)
        try:
            generate_answers(model, proc, encoded[:args.batch_size], **kw)
            break
        except Exception as e:  # a one-shot GPU run should still report the next level down
            if level == "none":
                raise
            compile_error += f"{level}: {type(e).__name__}: {e}"[:300] + "; "
            print(f"compile level {level!r} failed ({compile_error}); trying the next")
    sync(device)
    warmup_s = time.perf_counter() - t0
    batch1_loop(model, proc, encoded[:2], args.max_new_tokens, device)  # warm the batch-1 path too

    def timed(fn, repeats: int = 1):
        """fn()'s result, median seconds over `repeats` calls, peak GB."""
        seconds = []
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            answers = fn()
            sync(device)
            seconds.append(time.perf_counter() - t0)
        return answers, float(np.median(seconds)), peak_gb(device)

    # the batch-1 loop is bound by the host's kernel launches, which vary between machines and
    # moments: run it before and after the batched paths and keep its faster pass
    base_answers, _, base_peak = timed(lambda: batch1_loop(model, proc, encoded[:args.n_batch1], args.max_new_tokens, device))
    base_answers, base_s = base_answers  # the loop's own clock: from its first question to its last
    alone = unshared(encoded[:args.n])
    alone_answers, alone_s, alone_peak = timed(lambda: generate_answers(model, proc, alone, **kw), args.repeats)
    fast_answers, fast_s, fast_peak = timed(lambda: generate_answers(model, proc, encoded[:args.n], **kw), args.repeats)
    parts = breakdown(proc, encoded[:args.n], kw, device) if args.breakdown else {}
    base_s_passes = [base_s, batch1_loop(model, proc, encoded[:args.n_batch1], args.max_new_tokens, device)[1]]
    base_s = min(base_s_passes)

    agree = float(np.mean([a == b for a, b in zip(base_answers, fast_answers[:args.n_batch1])]))
    qps = lambda n, s: round(n / s, 2)  # noqa: E731
    res = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "preset": args.preset,
        "dtype": str(dtype).replace("torch.", ""), "attn": args.attn, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_mean": round(prompt_tokens, 1), "image_tokens": model.config.num_image_tokens,
        "questions_per_image": round(len(items) / len({id(it["image"]) for it in items}), 2),
        "batch1_questions": args.n_batch1, "batch1_qps": qps(args.n_batch1, base_s),
        "batch1_qps_passes": [qps(args.n_batch1, t) for t in base_s_passes], "batch1_peak_gb": base_peak,
        "batched_questions": args.n, "batch_size": args.batch_size, "prefix_batch": args.prefix_batch,
        "repeats": args.repeats, "compiled": level,
        "cudnn_benchmark": args.cudnn_benchmark, "batched_qps": qps(args.n, fast_s), "batched_peak_gb": fast_peak,
        "speedup": round((args.n / fast_s) / (args.n_batch1 / base_s), 2),
        "batched_unshared_qps": qps(args.n, alone_s), "batched_unshared_peak_gb": alone_peak,
        "speedup_unshared": round((args.n / alone_s) / (args.n_batch1 / base_s), 2),
        "warmup_s": round(warmup_s, 1), "answer_agreement": round(agree, 3),
        "shared_equals_unshared": round(float(np.mean([a == b for a, b in zip(fast_answers, alone_answers)])), 3),
        "compile_error": compile_error, "preprocess_images_per_s_cpu": round(preprocess_ips, 1),
        "breakdown_s": parts,
    }
    print(f"\nTextVQA-style generation, {res['preset']} random init, {res['dtype']}, {res['device']}")
    print(f"prompt {res['prompt_tokens_mean']} tokens (incl. {res['image_tokens']} image tokens), "
          f"{res['max_new_tokens']} new tokens per question, {res['questions_per_image']} questions per image")
    print(f"{'path':<44}{'questions':>10}{'q/s':>10}{'peak GB':>10}{'speed-up':>10}")
    graphs = {"all": "+compiled", "decode": "+graphs", "none": ""}[level]
    for name, n, q, peak, x in (("batch-1 loop (model.generate)", args.n_batch1, res["batch1_qps"], base_peak, 1.0),
                                (f"batched b={args.batch_size} static{graphs}, no sharing", args.n,
                                 res["batched_unshared_qps"], alone_peak, res["speedup_unshared"]),
                                (f"batched b={args.batch_size} static{graphs}, shared prefix", args.n,
                                 res["batched_qps"], fast_peak, res["speedup"])):
        print(f"{name:<44}{n:>10}{q:>10}{peak:>10}{x:>9}x")
    print(f"same answers as the batch-1 loop on {agree:.0%} of its questions, shared == unshared on "
          f"{res['shared_equals_unshared']:.0%}; warm-up {res['warmup_s']} s; "
          f"CPU preprocessing {res['preprocess_images_per_s_cpu']} images/s")
    if parts:
        print("breakdown (s, synchronised):", json.dumps(parts))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
