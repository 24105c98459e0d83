"""Do the stage-1 caption sets name the sign's true word? (CPU, tiny world, issue #10)

    python bench/caption_word_audit.py [--sets data/raw/llava.json,data/enhanced/llava.json] [--out audit.json]

Every raw seed image is a scene of the world's `raw` stream; its id gives back the scene (the same
draws `prepare` rendered it from), so the sign's true word is known. For each LLaVA caption set built on
those images (the raw alt-texts, the teacher's re-captions), per caption: does it name the true word,
or only another of the world's sign words (a wrong reading), and what share of its words the true word
is. Tiny world only: a real seed folder has no ground truth.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmlab import io  # noqa: E402
from vlmlab.sim.scene import sample_scene  # noqa: E402
from vlmlab.sim.streams import SPLITS, split_rng  # noqa: E402
from vlmlab.sim.text import SIGN_WORDS  # noqa: E402
from vlmlab.sim.world import WorldConfig  # noqa: E402


def audit(records: list[dict], truth: dict[str, str]) -> dict:
    """records: LLaVA records (last turn the caption); truth: image id -> the sign's word."""
    signs = set(SIGN_WORDS)
    n = right = wrong = words = 0
    shares = []
    for r in records:
        word = truth[Path(r["image"]).stem]
        text = re.findall(r"\w+", r["conversations"][-1]["value"].lower())
        n, words = n + 1, words + len(text)
        if word in text:
            right += 1
            shares.append(text.count(word) / len(text))
        elif any(t in signs for t in text):
            wrong += 1
    return {"captions": n, "name_true_word": round(right / n, 4), "name_only_another_sign_word": round(wrong / n, 4),
            "name_no_sign_word": round((n - right - wrong) / n, 4), "words_per_caption": round(words / n, 2),
            "true_word_share_of_words_where_named": round(sum(shares) / max(len(shares), 1), 4),
            "chance_of_a_random_sign_word": round(1 / len(signs), 4)}


def true_word(seed: int, image_id: str, split: str = "raw") -> str:
    """The sign's word of `split`'s image `image_id`, from the draws prepare rendered it from."""
    return sample_scene(split_rng(seed, split, int(image_id) - SPLITS[split][1])).word


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="data/raw/llava.json,data/enhanced/llava.json")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cfg = WorldConfig.from_params(io.load_params(a.params))
    sets = {path: json.loads(Path(path).read_text(encoding="utf-8")) for path in a.sets.split(",")}
    ids = sorted({Path(r["image"]).stem for records in sets.values() for r in records})
    truth = {i: true_word(cfg.seed, i) for i in ids}
    result = {"world_seed": cfg.seed, "images": len(ids), "sets": {path: audit(records, truth) for path, records in sets.items()}}
    print(json.dumps(result, indent=1))
    if a.out:
        io.write_json(a.out, result)


if __name__ == "__main__":
    main()
