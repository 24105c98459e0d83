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
A line whose image is missing or unreadable goes to <out>.rejects.jsonl with its reason;
a whole unusable input (no model, no question file, a wrong adapter) stops with one line.
Other options: --dtype float32|bfloat16|float16, --attn_implementation eager|sdpa|flash_attention_2,
--device cpu|cuda, --threads N (CPU).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from vlmlab.io import fail, write_jsonl

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


def load_model(path: str | os.PathLike, dtype=None, attn_implementation: str | None = None, device: str = "cpu"):
    """A base/full/merged MGM folder, or a peft LoRA adapter folder -> (model in eval mode, MgmProcessor)."""
    import vlmlab.models  # noqa: F401  (registers the mgm model type)
    from vlmlab.models.mgm import MgmForConditionalGeneration
    from vlmlab.models.processor import CONFIG_NAME, MgmProcessor

    folder = _resolve(path)
    if not folder.is_dir():
        raise fail(f"{path}: no such model folder (give models/zoo, models/runs/<run> or models/merged/<run>)")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise fail(f"dtype {dtype!r} unknown; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    adapter_cfg = folder / "adapter_config.json"
    try:
        if adapter_cfg.is_file():
            from peft import PeftModel

            base_ref = json.loads(adapter_cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
            base = _resolve(base_ref)
            if not base_ref or not (base / "config.json").is_file():
                raise fail(f"{adapter_cfg}: base_model_name_or_path {base_ref!r} is not a model folder here "
                           "(it must be a path relative to the repository root, e.g. models/zoo)")
            model = MgmForConditionalGeneration.from_pretrained(str(base), **kwargs)
            model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        elif (folder / "config.json").is_file():
            model = MgmForConditionalGeneration.from_pretrained(str(folder), **kwargs)
        else:
            raise fail(f"{folder}: neither config.json (an MGM folder) nor adapter_config.json (a LoRA adapter)")
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        # a peft adapter built for another base, or a folder that is not an MGM: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise fail(f"{folder}: cannot load this model/adapter ({type(e).__name__}: {first[:300]})") from None
    # an adapter folder may carry no processor of its own: its base's
    proc_dir = base if adapter_cfg.is_file() and not (folder / CONFIG_NAME).is_file() else folder
    if not (proc_dir / CONFIG_NAME).is_file():
        raise fail(f"{folder}: no {CONFIG_NAME} beside the model (save it with MgmProcessor.save_pretrained)")
    processor = MgmProcessor.from_pretrained(proc_dir)
    return model.to(device).eval(), processor


def open_image(path: Path) -> Image.Image:
    with Image.open(path) as f:
        return f.convert("RGB")


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
    """Question jsonl -> (usable rows with their image path, rejects with reasons)."""
    rows, rejects = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rejects.append({"line": n, "id": None, "reason": "bad_json", "detail": e.msg})
                continue
            if not isinstance(obj, dict):
                rejects.append({"line": n, "id": None, "reason": "bad_schema",
                                "detail": f"a {type(obj).__name__}, not an object"})
                continue
            qid = obj.get("question_id", obj.get("id", n))
            question = obj.get("text", obj.get("question"))
            if not question or not obj.get("image"):
                rejects.append({"line": n, "id": qid, "reason": "missing_field", "detail": "needs text and image"})
                continue
            image = Path(obj["image"]) if Path(obj["image"]).is_absolute() else image_root / obj["image"]
            rows.append({"line": n, "question_id": qid, "question": question, "image_path": image})
    return rows, rejects


def main(model: str, image: str | None = None, question: str | None = None, questions: str | None = None,
         image_root: str | None = None, out: str | None = None, batch_size: int = 16, max_new_tokens: int = 32,
         do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
         dtype: str | None = None, attn_implementation: str | None = None, device: str = "cpu",
         threads: int | None = None) -> None:
    if (questions is None) == (question is None):
        raise fail("give either --question (with --image) or --questions <file.jsonl>")
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
        try:
            r["image"] = open_image(r["image_path"])
        except (FileNotFoundError, IsADirectoryError):
            r["error"] = ("missing_image", f"{r['image_path']}: no such image file")
        except (UnidentifiedImageError, OSError) as e:
            r["error"] = ("unreadable_image", f"{r['image_path']}: {e}")
    if questions is None and "error" in rows[0]:
        raise fail(rows[0]["error"][1])
    rejects += [{"line": r["line"], "id": r["question_id"], "reason": r["error"][0], "detail": r["error"][1]}
                for r in rows if "error" in r]
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
        if rejects:
            write_jsonl(f"{out}.rejects.jsonl", rejects)
    if questions is None:
        print(results[0]["text"])
    else:
        print(f"infer: {len(results)} answers{' -> ' + out if out else ''}, {len(rejects)} rejected")


if __name__ == "__main__":
    import fire

    from vlmlab.determinism import pin

    pin()  # before any tensor op: CPU kernels bit for bit on any x86; --threads still sets the count

    fire.Fire(main)
