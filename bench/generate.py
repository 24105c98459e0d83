"""TextVQA-style questions/s: a batch-1 `model.generate` loop (as MGM's model_vqa_loader)
against vlmlab's batched greedy path, side by side in one run, same model, same prompts.

    python bench/generate.py --out bench_generate.json                 # mgm-2b, random init, bf16, CUDA
    python bench/generate.py --preset tiny --n 16 --n-batch1 4 --batch-size 8 --out /tmp/g.json   # CPU smoke

Both paths get images already pre-processed and staged on the GPU (MGM's loader
prefetches them in DataLoader workers, so preprocessing is off the GPU's critical path
there too; its CPU cost is reported separately) and generate exactly `--max-new-tokens` tokens: the weights are
random, so stopping early would make the two paths do different work.
The batched path: prompts sorted by length, left padding, image features in chunks,
one prefill, then a static KV cache with the decode step compiled (CUDA graphs) on CUDA.
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
from vlmlab.evaluate.generate import TEXTVQA_SUFFIX, GreedyDecoder, generate_answers
from vlmlab.models import presets
from vlmlab.models.mgm import MgmForConditionalGeneration
from vlmlab.models.processor import MgmProcessor
from vlmlab.models.tokenizer import train_world_tokenizer

QUESTIONS = ["what is the brand of this camera", "what does the small white text spell", "what kind of beer is this",
             "what brand liquor is on the right", "how long has the drink on the right been aged",
             "what number is on the player's jersey", "what is written on the sign", "what time is shown",
             "who is the author of this book", "what is the name of the store"]
OCR = "dakota digital single use camera stone ale sublimely self righteous bowmore islay whisky scotch malt " \
      "copenhagen drupalcon coca cola 10 years 2015 open sale stop exit main street book store the new york times"


def build(preset: str, device: str, dtype: torch.dtype, attn: str):
    """A random-init MGM of `preset` shapes with a word-level tokenizer (no downloads)."""
    tok = train_world_tokenizer([" ".join(QUESTIONS), OCR, TEXTVQA_SUFFIX, "Reference OCR token:"])
    kw = {"image_token_id": tok.convert_tokens_to_ids("<image>"), "pad_token_id": tok.pad_token_id,
          "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if attn != "sdpa":  # sdpa is the default; naming it explicitly trips ConvNext's (attention-free) check
        kw["attn_implementation"] = attn
    if preset == "tiny":
        kw["vocab_size"] = len(tok)  # mgm-2b keeps Gemma's 256000 rows: the LM head's real cost
    config = presets.build_config(preset, **kw)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 3B-parameter CPU init takes minutes
        model = MgmForConditionalGeneration(config)
    model = model.to(dtype).eval()
    return model, MgmProcessor.for_model(tok, config)


def textvqa_items(n: int, image_side: int, n_images: int = 32, seed: int = 0) -> list[dict]:
    """LLaVA TextVQA prompts ("<q>\\nReference OCR token: ...\\n<suffix>") with varied lengths;
    random 4:3 images from a pool of `n_images` (TextVQA asks ~1.6 questions per image)."""
    rng = np.random.default_rng(seed)
    words = OCR.split()
    pool = [Image.fromarray(rng.integers(0, 255, (image_side, image_side * 4 // 3, 3), dtype=np.uint8))
            for _ in range(n_images)]
    items = []
    for i in range(n):
        ocr = ", ".join(rng.choice(words, size=int(rng.integers(0, 25))))
        q = QUESTIONS[i % len(QUESTIONS)].capitalize() + "?"
        prompt = f"{q}\nReference OCR token: {ocr}\n{TEXTVQA_SUFFIX}" if ocr else f"{q}\n{TEXTVQA_SUFFIX}"
        items.append({"prompt": prompt, "image": pool[i % n_images]})
    return items


def encode(proc, items, device: str = "cpu", dtype=torch.float32) -> tuple[list[dict], float]:
    """Pre-process every item; each distinct image once, its views kept on `device` in `dtype`
    and shared by its questions (TextVQA's 3166 val images are 11 GB in bf16: they fit).
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
        e = proc.encode_prompt("<image>\n" + it["prompt"])  # ids only, <image> expanded
        encoded.append({**e, **views[key]})
    return encoded, len(views) / t_images


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
    ap.add_argument("--vision-batch", type=int, default=32, help="images per tower call (MGM's high-res map is big)")
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--no-compile", action="store_true", help="static cache without torch.compile/CUDA graphs")
    ap.add_argument("--out", required=True, help="JSON file for the numbers")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    compile_decode = device == "cuda" and not args.no_compile
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
    model, proc = build(args.preset, device, dtype, args.attn)
    items = textvqa_items(max(args.n, args.n_batch1), proc.image_size_aux)

    encoded, preprocess_ips = encode(proc, items, device, dtype)  # both paths read the same staged images
    prompt_tokens = float(np.mean([len(e["input_ids"]) for e in encoded]))

    # warm-up (and compile) on one batch, outside the timing
    decoder = GreedyDecoder(model, [], proc.tokenizer.pad_token_id, args.max_new_tokens, cache="static",
                            compile=compile_decode, vision_batch=args.vision_batch)  # [] : never stop early
    cache_len = max(len(e["input_ids"]) for e in encoded) + args.max_new_tokens  # one shape for every batch
    kw = dict(batch_size=args.batch_size, decoder=decoder, cache_len=cache_len)
    t0 = time.perf_counter()
    compile_error = ""
    try:
        generate_answers(model, proc, encoded[:args.batch_size], **kw)
    except Exception as e:  # a one-shot GPU run should still report the uncompiled static path
        if not compile_decode:
            raise
        compile_error = f"{type(e).__name__}: {e}"[:300]
        print(f"torch.compile of the decode step failed ({compile_error}); timing without it")
        compile_decode = False
        kw["decoder"] = GreedyDecoder(model, [], proc.tokenizer.pad_token_id, args.max_new_tokens, cache="static",
                                      vision_batch=args.vision_batch)
        generate_answers(model, proc, encoded[:args.batch_size], **kw)
    sync(device)
    warmup_s = time.perf_counter() - t0
    batch1_loop(model, proc, encoded[:2], args.max_new_tokens, device)  # warm the batch-1 path too

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_answers, base_s = batch1_loop(model, proc, encoded[:args.n_batch1], args.max_new_tokens, device)
    base_peak = peak_gb(device)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    fast_answers = generate_answers(model, proc, encoded[:args.n], **kw)
    sync(device)
    fast_s = time.perf_counter() - t0
    fast_peak = peak_gb(device)

    agree = float(np.mean([a == b for a, b in zip(base_answers, fast_answers[:args.n_batch1])]))
    res = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "preset": args.preset,
        "dtype": str(dtype).replace("torch.", ""), "attn": args.attn, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_mean": round(prompt_tokens, 1), "image_tokens": model.config.num_image_tokens,
        "batch1_questions": args.n_batch1, "batch1_qps": round(args.n_batch1 / base_s, 2), "batch1_peak_gb": base_peak,
        "batched_questions": args.n, "batch_size": args.batch_size, "vision_batch": args.vision_batch,
        "batched_compiled": compile_decode, "batched_qps": round(args.n / fast_s, 2), "batched_peak_gb": fast_peak,
        "speedup": round((args.n / fast_s) / (args.n_batch1 / base_s), 2), "warmup_s": round(warmup_s, 1),
        "answer_agreement": round(agree, 3), "compile_error": compile_error, "preprocess_images_per_s_cpu": round(preprocess_ips, 1),
    }
    print(f"\nTextVQA-style generation, {res['preset']} random init, {res['dtype']}, {res['device']}")
    print(f"prompt {res['prompt_tokens_mean']} tokens (incl. {res['image_tokens']} image tokens), "
          f"{res['max_new_tokens']} new tokens per question")
    print(f"{'path':<40}{'questions':>10}{'q/s':>10}{'peak GB':>10}")
    print(f"{'batch-1 loop (model.generate)':<40}{args.n_batch1:>10}{res['batch1_qps']:>10}{base_peak:>10}")
    name = f"batched b={args.batch_size} static{'+graphs' if compile_decode else ''}"
    print(f"{name:<40}{args.n:>10}{res['batched_qps']:>10}{fast_peak:>10}")
    print(f"speed-up {res['speedup']}x; same answers on {agree:.0%} of the batch-1 questions; "
          f"warm-up {res['warmup_s']} s; CPU preprocessing {res['preprocess_images_per_s_cpu']} images/s")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
