"""bench/caption_word_audit.py: it finds the true sign word in captions that name it and calls a caption
naming another sign word a wrong reading."""
import importlib.util
from pathlib import Path

from vlmlab.sim import text
from vlmlab.sim.scene import sample_scene
from vlmlab.sim.streams import item_id, split_rng
from vlmlab.sim.world import image_path

spec = importlib.util.spec_from_file_location("caption_word_audit", Path(__file__).parents[1] / "bench/caption_word_audit.py")
audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)


def records(n: int, seed: int, caption) -> list[dict]:
    out = []
    for i in range(n):
        rng = split_rng(seed, "raw", i)
        scene = sample_scene(rng)
        out.append({"image": image_path(item_id("raw", i)), "conversations": [{"from": "gpt", "value": caption(scene, rng)}]})
    return out


def test_the_audit_reads_the_scene_back_from_the_image_id():
    seed, n = 3, 200
    truth = {Path(r["image"]).stem: audit.true_word(seed, Path(r["image"]).stem) for r in records(n, seed, lambda s, r: "")}
    clean = audit.audit(records(n, seed, lambda s, rng: text.web_caption(s, rng, 0.0)), truth)
    assert clean["name_only_another_sign_word"] == 0 and clean["name_true_word"] > 0.3
    dense = audit.audit(records(n, seed, lambda s, rng: text.dense_caption(s, rng)), truth)
    assert dense["name_only_another_sign_word"] == 0
    words = text.SIGN_WORDS
    wrong = audit.audit(records(n, seed, lambda s, rng: f"a sign that reads {words[(words.index(s.word) + 1) % len(words)]}"),
                        truth)
    assert wrong["name_only_another_sign_word"] == 1.0 and wrong["name_true_word"] == 0
    other_seed = audit.audit(records(n, seed + 1, lambda s, rng: f"a sign that reads {s.word}"), truth)
    assert other_seed["name_true_word"] < 0.2   # another world's scenes: chance, 1 in 32
