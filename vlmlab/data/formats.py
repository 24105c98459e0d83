"""Data-Juicer jsonl <-> LLaVA/MGM json, lossless on ids, images and caption text.

DJ text is `"<__dj__image>\\n<caption> <|__dj__eoc|>"` (the challenge seed); after Data-Juicer's
image_captioning_mapper it is `"<__dj__image> <caption>\\n <|__dj__eoc|>"`. Both parse to the
same stripped caption. LLaVA records keep the human prompt that the DJ seed dropped: as in
Data-Juicer's `dj_to_llava --restore_questions`, it is restored by id from the original
stage_1.json; ids it lacks get a prompt from the stage-1 pool, chosen by a seeded hash of
the id (so a sample's prompt does not depend on file order).

Why not call Data-Juicer's converter: `tools/fmt_conversion/.../dj_to_llava.py` is a CLI
script (not part of the installed API), fails on an id that stage_1.json lacks and reads
whole files only; this module keeps its semantics (tests check byte equality with its output
on the real challenge lines) and works on in-memory rows.
"""
from __future__ import annotations

import hashlib
import json
import os

from vlmlab.io import write_text

IMAGE_TOKEN = "<__dj__image>"   # Data-Juicer's SpecialTokens.image
EOC_TOKEN = "<|__dj__eoc|>"     # Data-Juicer's SpecialTokens.eoc
LLAVA_IMAGE = "<image>"
# The 11 human prompts of MGM's stage_1.json (all 10k seed samples use one of them).
CAPTION_PROMPTS = (
    "What is in the photo?",
    "What is this?",
    "Describe the image concisely.",
    "Give a brief description of the image.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "Render a clear and concise summary of the photo.",
    "Share a concise interpretation of the image provided.",
    "Give a short and clear explanation of the subsequent image.",
    "Write a terse but informative summary of the picture.",
    "Present a compact description of the photo's key features.",
)


class FormatError(ValueError):
    """A sample that cannot be converted; `.reason` is the rejects reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def dj_text(caption: str) -> str:
    """The seed set's layout: image token, newline, caption, space, end-of-chunk token."""
    return f"{IMAGE_TOKEN}\n{caption} {EOC_TOKEN}"


def caption_of(text: str) -> str:
    """The caption inside a one-image DJ text, stripped; FormatError if a token is missing or it is empty."""
    body = text.strip()
    if not body.startswith(IMAGE_TOKEN):
        raise FormatError("missing_image_token", f"text does not start with {IMAGE_TOKEN}")
    if not body.endswith(EOC_TOKEN):
        raise FormatError("missing_eoc_token", f"text does not end with {EOC_TOKEN}")
    caption = body[len(IMAGE_TOKEN):-len(EOC_TOKEN)].strip()
    if not caption:
        raise FormatError("empty_caption", "no text between the image and end-of-chunk tokens")
    return caption


def pool_prompt(sample_id: str, seed: int) -> str:
    """A stage-1 prompt for an id that stage_1.json does not know: seeded, order-independent."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return f"{LLAVA_IMAGE}\n{CAPTION_PROMPTS[int.from_bytes(digest[:8], 'big') % len(CAPTION_PROMPTS)]}"


def prompts_by_id(llava_records: list[dict]) -> dict[str, str]:
    """{id: human turn value} from LLaVA records (e.g. stage_1.json)."""
    return {str(r["id"]): r["conversations"][0]["value"] for r in llava_records}


def dj_to_llava(rows: list[dict], prompts: dict[str, str] | None = None, seed: int = 0) -> list[dict]:
    """DJ rows -> LLaVA records {"id", "conversations", "image"} (Data-Juicer's key order)."""
    prompts = prompts or {}
    out = []
    for row in rows:
        sid = row["id"]
        images = row.get("images") or []
        if len(set(images)) != 1:
            raise FormatError("bad_images", f"id {sid}: LLaVA records hold exactly one image, got {len(set(images))}")
        human = prompts.get(str(sid)) or pool_prompt(str(sid), seed)
        out.append({"id": sid, "conversations": [{"from": "human", "value": human},
                                                 {"from": "gpt", "value": caption_of(row["text"])}],
                    "image": images[0]})
    return out


def llava_to_dj(records: list[dict]) -> list[dict]:
    """Single-round LLaVA caption records -> DJ rows {"id", "text", "images"} in the seed layout."""
    out = []
    for r in records:
        conv = r["conversations"]
        if len(conv) != 2 or conv[1]["from"] != "gpt":
            raise FormatError("not_single_round", f"id {r['id']}: {len(conv)} turns; the DJ seed layout holds one caption")
        out.append({"id": r["id"], "text": dj_text(conv[1]["value"]), "images": [r["image"]]})
    return out


def write_llava(path: str | os.PathLike, records: list[dict]) -> None:
    """As upstream writes stage_1.json: indent 2, UTF-8 kept, no trailing newline."""
    write_text(path, json.dumps(records, indent=2, ensure_ascii=False))


def read_llava(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
