"""Training data: a LLaVA json + its image folder, encoded once; a collator that pads and stacks.

Everything the processor does (chat template, `<image>` expansion, answer-only labels, both
image resolutions) happens once per sample when the dataset is built, not in every epoch
or worker: on a 2-core CPU re-decoding JPEGs each step would cost more than the model.
Samples that share an image (the enhanced set re-captions each image several times) share
one pair of pixel tensors.
"""
from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from vlmlab import io
from vlmlab.batching import IGNORE_INDEX, pad



def read_llava_json(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise io.fail(f"{path}: training data not found (run the stage that makes it, e.g. `dvc repro prepare`)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise io.fail(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected a LLaVA json list") from None
    if not isinstance(records, list) or not records:
        raise io.fail(f"{path}: expected a non-empty JSON list of LLaVA records ({{id, image, conversations}})")
    return records


class ConversationDataset(Dataset):
    """LLaVA/MGM training json -> encoded samples (dicts of tensors), with counted rejects.

    `image_root` is the folder the records' `image` paths are relative to (the json's own
    folder for data/raw and data/enhanced).
    """

    def __init__(self, json_path: str | Path, processor, image_root: str | Path | None = None,
                 max_length: int = 0, desc: str = "encode"):
        json_path = Path(json_path)
        image_root = Path(image_root) if image_root is not None else json_path.parent
        records = read_llava_json(json_path)
        results = _encode_all(records, image_root, processor, max_length, desc)
        self.samples: list[dict] = []
        self.rejects: list[dict] = []
        for line, (rec, (reason, detail, sample)) in enumerate(zip(records, results), 1):
            if reason:
                self.rejects.append({"line": line, "id": rec.get("id") if isinstance(rec, dict) else None,
                                     "reason": reason, "detail": detail})
            else:
                self.samples.append(sample)
        if not self.samples:
            counts = Counter(r["reason"] for r in self.rejects)
            raise io.fail(f"{json_path}: no usable training sample ({dict(counts)}); check the images under {image_root}")
        self.num_tokens = sum(len(s["input_ids"]) for s in self.samples)

    def reject_counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejects))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def _encode_one(rec, image_root: Path, processor, shared: dict, max_length: int):
    """One record -> (reject reason, detail, None) or (None, None, sample)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
        return "bad_record", "no conversations list", None
    key = rec.get("image")
    if not key:
        return "no_image", "record has no image field", None
    if key not in shared:
        path = image_root / key
        if not path.is_file():
            return "missing_image", str(path), None
        try:
            with Image.open(path) as im:
                shared[key] = im.convert("RGB")
        # what PIL raises on files it cannot decode: OSError (truncated, unidentified), SyntaxError and
        # ValueError (malformed headers in some plugins), DecompressionBombError (over MAX_IMAGE_PIXELS x 2)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            return "bad_image", f"{path}: {type(e).__name__}: {e}", None
    try:
        enc = processor.encode_conversation(rec["conversations"], shared[key])
    except (ValueError, KeyError) as e:
        return "encode_error", str(e), None
    input_ids, labels = enc["input_ids"], enc["labels"]  # (T,), (T,)
    if max_length and len(input_ids) > max_length:
        return "too_long", f"{len(input_ids)} tokens > max_length {max_length}", None
    if not bool((labels != IGNORE_INDEX).any()):
        return "no_answer_tokens", "every label is masked", None
    # one pair of pixel tensors per image, whatever the number of captions on it: _LastImage hands
    # every record of the image the same (3, S, S) and (3, S', S') tensors
    return None, None, {"input_ids": input_ids, "labels": labels,
                        "pixel_values": enc["pixel_values"], "pixel_values_aux": enc["pixel_values_aux"]}


def _encode_all(records: list, image_root: Path, processor, max_length: int, desc: str) -> list:
    """Encode every record, in image order: an image shared by several records is decoded and
    resized once (the enhanced set re-captions each image 3 times). One process: forked
    workers were slower here, since pickling the pixels back costs as much as making them."""
    by_image = sorted(range(len(records)),
                      key=lambda i: str(records[i].get("image", "") if isinstance(records[i], dict) else ""))
    processor = copy.copy(processor)
    processor.images = _LastImage(processor.images)
    shared: dict[str, Image.Image] = {}  # the current image path -> its decoded image
    results: list = [None] * len(records)
    for i in tqdm(by_image, desc=desc, mininterval=5, disable=None):
        key = records[i].get("image") if isinstance(records[i], dict) else None
        if key not in shared:
            shared.clear()  # records come sorted by image: the previous one is done with
        results[i] = _encode_one(records[i], image_root, processor, shared, max_length)
    return results


class _LastImage:
    """Wraps `processor.images`: the views of the image it was just given are not computed again.

    The same PIL object always gives the same views, so this only skips work (a third of
    encoding time on the enhanced set).
    """

    def __init__(self, images):
        self.images, self.last, self.views = images, None, None

    def __call__(self, image):
        if image is not self.last:
            self.last, self.views = image, self.images(image)
        return dict(self.views)


@dataclass
class PadCollator:
    """Right-pads input_ids (pad id) and labels (-100), builds the attention mask, stacks pixels.

    `dedup_images`: rows that share an image (one pixel tensor, as ConversationDataset stores them)
    send it once: pixels (U, ...) of the batch's distinct images and `image_index` (B,), row -> image,
    so the model runs its towers once per image (MgmForConditionalGeneration.get_image_features)."""

    pad_token_id: int
    pad_to_multiple_of: int = 8  # tensor-core friendly shapes on GPU; harmless on CPU
    dedup_images: bool = False

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad([b["input_ids"] for b in batch], self.pad_token_id,
                                        multiple_of=self.pad_to_multiple_of)    # (B, T)
        labels, _ = pad([b["labels"] for b in batch], IGNORE_INDEX, multiple_of=self.pad_to_multiple_of)  # (B, T)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = batch
        if self.dedup_images:
            slot: dict[int, int] = {}    # pixel tensor -> its image's index in this batch
            first: dict[int, dict] = {}  # image index -> the first row that carries it
            index = [slot.setdefault(id(b["pixel_values"]), len(slot)) for b in batch]
            for u, b in zip(index, batch):
                first.setdefault(u, b)
            images = [first[u] for u in range(len(slot))]
            out["image_index"] = torch.tensor(index)                                   # (B,)
        out["pixel_values"] = torch.stack([b["pixel_values"] for b in images])          # (U, 3, H, W)
        out["pixel_values_aux"] = torch.stack([b["pixel_values_aux"] for b in images])  # (U, 3, H', W')
        return out
