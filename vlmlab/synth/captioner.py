"""A captioner folder (BLIP-2 or the tiny teacher) loaded and run as Data-Juicer's image_captioning_mapper does."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from vlmlab import io

MAX_NEW_TOKENS = 128  # hard-coded in Data-Juicer's image_captioning_mapper


def load_captioner(path: str | Path, trust_remote_code: bool = True):
    """Load a captioner folder the way Data-Juicer does: AutoProcessor + `config.architectures[0]`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise io.fail(f"captioner {path}: no config.json there; train it (dvc repro teacher) "
                      "or set synth.captioner to a local BLIP-2 folder")
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model_class = getattr(transformers, config.architectures[0])
        model = model_class.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise io.fail(f"captioner {path}: does not load as a transformers model + processor ({e})") from None
    return model, processor


@torch.no_grad()
def caption_images(model, processor, images: list[Image.Image], batch_size: int = 64,
                   do_sample: bool = True) -> list[str]:
    """Captions as Data-Juicer's op makes them: processor(images) -> generate(128 new, sampled) -> decode."""
    out = []
    for i in range(0, len(images), batch_size):
        inputs = processor(images=images[i: i + batch_size], return_tensors="pt").to(model.device)
        ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=do_sample)
        out += processor.batch_decode(ids, skip_special_tokens=True)
    return [c.strip() for c in out]


def read_caption_set(folder: str | Path) -> tuple[list[Image.Image], list[str], list[str]]:
    """(images, captions, ids) of a DJ caption set (data/world/curated: dj.jsonl + images/)."""
    from vlmlab.data.formats import FormatError, caption_of

    folder = Path(folder)
    images, captions, ids = [], [], []
    for n, row in enumerate(io.read_jsonl(folder / "dj.jsonl"), 1):
        try:
            captions.append(caption_of(row["text"]))
            with Image.open(folder / row["images"][0]) as im:
                images.append(im.convert("RGB"))
        except (FormatError, OSError, KeyError, IndexError) as e:
            raise io.fail(f"{folder / 'dj.jsonl'}:{n}: unusable training sample ({e}); re-run `dvc repro prepare`")
        ids.append(str(row["id"]))
    if not captions:
        raise io.fail(f"{folder / 'dj.jsonl'}: no samples to train the teacher on")
    return images, captions, ids
