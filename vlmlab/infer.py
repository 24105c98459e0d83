"""Inference with a trained MGM: one image + question, or a jsonl of them in batches.

    # one question (answer printed; add --out to also write it as jsonl)
    python -m vlmlab.infer --model models/zoo --image data/world/eval/images/00000/x.jpg \
        --question "What does the sign say?"

    # a jsonl of questions, batched with a KV cache, answers written as jsonl
    python -m vlmlab.infer --model models/runs/blip2_lora --questions q.jsonl --image_root data/world/eval \
        --out answers.jsonl --batch_size 32 --max_new_tokens 16

    # sampled instead of greedy
    python -m vlmlab.infer --model models/merged/blip2_lora --image x.jpg --question "Describe the image." \
        --do_sample --temperature 0.7 --top_p 0.9 --seed 1

--model is any of: a base or fully fine-tuned MGM folder (models/zoo, models/runs/<full run>),
a merged model (models/merged/<run>), or a LoRA adapter folder (models/runs/<lora run>: its
adapter_config.json names the base model, a path relative to the repository root).
The processor is read from the same folder (adapter folders carry one too).

Question files: one object a line, LLaVA's question-file layout
  {"question_id": ..., "image": "relative/or/absolute.jpg", "text": "the question"}
("question" is accepted for "text", "id" for "question_id"); image paths are relative to
--image_root (default: the jsonl's folder). Output lines:
  {"question_id": ..., "prompt": ..., "text": <answer>, "model": <--model>}
A line that cannot be used (not UTF-8, not JSON, a field of the wrong type, an image that is
missing, unreadable or over PIL's decompression-bomb pixel limit) goes to <out>.rejects.jsonl
with its line number and reason (the file is rewritten on every run, empty when nothing was
rejected); a whole unusable input (no model, no question file, a wrong adapter, a bad option,
an --out that is a folder or cannot be written) stops with one line before the model loads.
Other options: --dtype float32|bfloat16|float16, --attn_implementation eager|sdpa|flash_attention_2,
--device cpu|cuda, --threads N (CPU).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

if __name__ == "__main__":  # the CLI: pin before torch imports numpy (vlmlab/determinism.py)
    from vlmlab.determinism import pin

    pin()  # CPU kernels bit for bit on any x86; --threads still sets the count

import torch
from PIL import Image, UnidentifiedImageError

from vlmlab.io import check_writable_file, fail, write_jsonl
from vlmlab.models.load import DTYPES, load_model


def open_image(path: Path) -> Image.Image:
    with Image.open(path) as f:
        return f.convert("RGB")


def image_problem(path: Path) -> tuple[Image.Image | None, tuple[str, str] | None]:
    """(RGB image, None), or (None, (reason, detail)) for a missing, unreadable or too large image."""
    try:
        return open_image(path), None
    except (FileNotFoundError, IsADirectoryError):
        return None, ("missing_image", f"{path}: no such image file")
    except Image.DecompressionBombError as e:  # PIL's pixel limit stays: the image is refused, not decoded
        return None, ("image_too_large", f"{path}: {e}")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return None, ("unreadable_image", f"{path}: {e}")


def generate_batch(model, processor, items: list[dict], max_new_tokens: int = 32, do_sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
    """items: [{"question": str, "image": PIL image}] -> answers, one left-padded batch, KV cache."""
    batch = processor.pad([processor.encode_prompt(it["question"], it["image"]) for it in items], "left")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = {k: v.to(device, dtype) if k.startswith("pixel") else v.to(device) for k, v in batch.items()}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, use_cache=True,
                             eos_token_id=processor.stop_token_ids,
                             pad_token_id=processor.tokenizer.pad_token_id, **sampling)
    return processor.batch_decode(out[:, batch["input_ids"].shape[1]:])


def read_questions(path: Path, image_root: Path) -> tuple[list[dict], list[dict]]:
    """Question jsonl -> (usable rows with their image path, rejects with line numbers and reasons)."""
    rows, rejects = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            def reject(reason: str, detail: str, qid=None) -> None:
                rejects.append({"line": n, "id": qid, "reason": reason, "detail": detail})

            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                reject("non_utf8", str(e))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                reject("bad_json", e.msg)
                continue
            if not isinstance(obj, dict):
                reject("bad_schema", f"a {type(obj).__name__}, not an object")
                continue
            qid = obj.get("question_id", obj.get("id", n))
            question, image = obj.get("text", obj.get("question")), obj.get("image")
            if not question or not image:
                reject("missing_field", "needs text and image", qid)
            elif not isinstance(question, str) or not isinstance(image, str):
                reject("bad_schema", f"text and image must be strings (text: {type(question).__name__}, "
                                     f"image: {type(image).__name__})", qid)
            else:
                image_path = Path(image) if Path(image).is_absolute() else image_root / image
                rows.append({"line": n, "question_id": qid, "question": question, "image_path": image_path})
    return rows, rejects


CHOICES = {"attn_implementation": (None, "eager", "sdpa", "flash_attention_2"),
           "dtype": (None, *DTYPES)}


def check_options(opts: dict) -> None:
    """Every option's type and range, before anything is read or loaded: one line naming the option.

    fire turns `--question 42` into an int and `--batch_size -1` into a negative one: both are refused here."""
    def bad(name: str, want: str) -> "StageError":
        value = opts[name]
        return fail(f"--{name} {value!r} ({type(value).__name__}): {want}")

    for name in ("model", "image", "question", "questions", "image_root", "out"):
        if opts[name] is not None and not isinstance(opts[name], str):
            raise bad(name, "must be text (quote it so the shell passes a string: --question '\"42\"')")
    for name, low in (("batch_size", 1), ("max_new_tokens", 1), ("seed", 0), ("threads", 1)):
        value = opts[name]
        if name == "threads" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(name, f"must be an integer >= {low}")
    for name, ok, want in (("temperature", lambda v: v > 0, "must be a number > 0"),
                           ("top_p", lambda v: 0 < v <= 1, "must be a number in (0, 1]")):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise bad(name, want)
    if not isinstance(opts["do_sample"], bool):
        raise bad("do_sample", "is a switch: --do_sample or --nodo_sample")
    for name, allowed in CHOICES.items():
        if opts[name] not in allowed:
            raise bad(name, f"use one of {', '.join(a for a in allowed if a)}")
    if not isinstance(opts["device"], str) or not re.fullmatch(r"cpu|cuda(:\d+)?", opts["device"]):
        raise bad("device", "use cpu, cuda or cuda:N")


def main(model: str, image: str | None = None, question: str | None = None, questions: str | None = None,
         image_root: str | None = None, out: str | None = None, batch_size: int = 16, max_new_tokens: int = 32,
         do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
         dtype: str | None = None, attn_implementation: str | None = None, device: str = "cpu",
         threads: int | None = None) -> None:
    check_options(dict(locals()))
    if (questions is None) == (question is None):
        raise fail("give either --question (with --image) or --questions <file.jsonl>")
    if out:  # before any work: an existing folder or the input is never replaced, an unwritable place fails now
        if questions and Path(questions).is_file() and Path(out).resolve() == Path(questions).resolve():
            raise fail(f"--out {out} is the --questions file: give another path; nothing was written")
        check_writable_file(out, "--out")
        check_writable_file(f"{out}.rejects.jsonl", "--out")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    if questions is None:
        if not image:
            raise fail("--question needs --image <path>")
        rows = [{"line": 1, "question_id": 0, "question": question, "image_path": Path(image)}]
        rejects: list[dict] = []
    else:
        qpath = Path(questions)
        if not qpath.is_file():
            raise fail(f"{questions}: no such question file (jsonl with question_id, image, text)")
        rows, rejects = read_questions(qpath, Path(image_root) if image_root else qpath.parent)
    # images are checked before the model loads: a typo fails fast
    for r in rows:
        r["image"], problem = image_problem(r["image_path"])
        if problem:
            r["error"] = problem
    if questions is None and "error" in rows[0]:
        raise fail(rows[0]["error"][1])
    rejects += [{"line": r["line"], "id": r["question_id"], "reason": r["error"][0], "detail": r["error"][1]}
                for r in rows if "error" in r]
    rejects.sort(key=lambda r: r["line"])
    rows = [r for r in rows if "error" not in r]
    mgm, processor = load_model(model, dtype=dtype, attn_implementation=attn_implementation, device=device)
    results = []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(rows), batch_size), desc="infer", disable=len(rows) <= batch_size):
        chunk = rows[i:i + batch_size]
        answers = generate_batch(mgm, processor, chunk, max_new_tokens, do_sample, temperature, top_p)
        results += [{"question_id": r["question_id"], "prompt": r["question"], "text": a, "model": str(model)}
                    for r, a in zip(chunk, answers)]
    if out:
        write_jsonl(out, results)
        write_jsonl(f"{out}.rejects.jsonl", rejects)  # always: a previous run's rejects must not look like this run's
    if questions is None:
        print(results[0]["text"])
    else:
        print(f"infer: {len(results)} answers{' -> ' + out if out else ''}, {len(rejects)} rejected")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
