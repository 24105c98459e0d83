"""The tiny world: closed vocabulary, reproducible bytes, held-out eval, sane texts and labels."""
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmlab.sim import text, vocab
from conftest import simulate_raw
from vlmlab.models.processor import END_OF_TURN, ROLES, START_OF_TURN
from vlmlab.sim.world import SEED_JSONL, SEED_PROMPTS, build_world, world_chat_corpus, world_text_corpus
from vlmlab.sim.labels import NUM_CLASSES, labelled_images, scene_labels
from vlmlab.sim.scene import SIGN_BAND, render, sample_scene

TINY = {"seed": 3, "world": {"raw_size": 24, "curated_size": 12, "instruct_size": 12, "eval_textvqa": 10,
                             "eval_caption": 6, "eval_mmbench": 8, "image_size": 96, "noise_rate": 0.35,
                             "jpeg_quality": 90}}


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("w")
    counts = simulate_raw(out, TINY)
    return out, counts


def all_texts(n=300, seed=0):
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        s = sample_scene(rng)
        out += [text.dense_caption(s, rng), text.web_caption(s, rng, 0.5)]
        qa = text.textvqa_item(s, rng)
        out += [qa["question"], *qa["answers"]]
        mc = text.mmbench_item(s, rng)
        out.append(text.mmbench_prompt(mc))
        out += [t["value"] for t in text.instruct_conversation(s, rng)]
    return out


def test_every_world_word_is_in_the_corpus_vocabulary(world):
    known = set(text.corpus_words()) | set(text.punctuation()) | {"<", ">", "image"}
    texts = all_texts() + world_text_corpus(500, seed=1) + list(text.CAPTION_PROMPTS)
    out, _ = world
    texts += [r["text"].split("\n", 1)[1].rsplit(" ", 1)[0] for r in map(json.loads, open(out / "raw/dj.jsonl"))]
    # the LM corpus' chat rounds: the template's special tokens and role words are the tokenizer's own
    texts = [s.replace(START_OF_TURN, " ").replace(END_OF_TURN, " ") for s in texts]
    known |= set(ROLES.values())
    unknown = Counter(t for s in texts for t in vocab.tokenize_words(s) if t not in known)
    assert not unknown, unknown.most_common(10)
    assert 150 < len(text.corpus_words()) < 400


def test_same_params_give_identical_bytes_whatever_the_worker_count(world, tmp_path):
    out, _ = world
    simulate_raw(tmp_path, {**TINY, "world": {**TINY["world"], "workers": 1}})
    assert tree_hashes(tmp_path) == tree_hashes(out)
    other = tmp_path / "seed4"
    build_world(other / "seed", other / "world", {**TINY, "seed": 4})
    assert (other / "seed" / SEED_JSONL).read_bytes() != (out / "raw/dj.jsonl").read_bytes()


def test_layout_counts_and_formats(world):
    out, counts = world
    assert counts == {"raw": 24, "curated": 12, "instruct": 12, "eval_textvqa": 10, "eval_caption": 6, "eval_mmbench": 8}
    rows = [json.loads(line) for line in open(out / "raw/dj.jsonl")]
    assert list(rows[0]) == ["id", "text", "images"]
    for r in rows:
        assert r["text"].startswith("<__dj__image>\n") and r["text"].endswith(" <|__dj__eoc|>")
        assert (out / "raw" / r["images"][0]).is_file() and r["images"][0] == f"images/{r['id'][:5]}/{r['id']}.jpg"
    llava = json.loads((out / "raw/llava.json").read_text())
    assert [r["id"] for r in llava] == [r["id"] for r in rows]
    assert all(r["conversations"][0]["value"].removeprefix("<image>\n") in text.CAPTION_PROMPTS for r in llava)
    ann = json.loads((out / "world/eval/textvqa_annotations.json").read_text())["data"]
    qs = [json.loads(line) for line in open(out / "world/eval/textvqa_questions.jsonl")]
    assert len(ann) == len(qs) == 10 and all(len(a["answers"]) == 10 for a in ann)
    assert all(q["question_id"] == a["image_id"] and q["text"].startswith(a["question"]) for q, a in zip(qs, ann))
    tsv = (out / "world/eval/mmbench.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    assert all(len(line.split("\t")) == 10 for line in tsv)
    caps = [json.loads(line) for line in open(out / "world/eval/captions.jsonl")]
    assert all(len(set(c["captions"])) >= 2 and len(c["captions"]) == 5 for c in caps)


def test_seed_folder_is_laid_out_as_the_challenges(world, fixtures_dir):
    """The simulator's seed folder against the real one (fixtures: a head of the challenge's jsonl and
    stage_1.json): same file names, same keys in the same order, same text framing, stage_1.json
    written as upstream writes it, and the jsonl and stage_1.json agree id by id."""
    out, _ = world
    real = fixtures_dir / "better_synth"
    assert SEED_JSONL == "mgm_pretrain_stage_1_10k.jsonl" and SEED_PROMPTS == "stage_1.json"
    rows = [json.loads(line) for line in open(out / "seed" / SEED_JSONL)]
    real_row = json.loads(open(real / "mgm_pretrain_stage_1_10k.head300.jsonl").readline())
    assert all(list(r) == list(real_row) for r in rows)
    stage1_text = (out / "seed" / SEED_PROMPTS).read_text()
    stage1, real_stage1 = json.loads(stage1_text), json.loads((real / "stage_1.subset.json").read_text())
    assert all(list(r) == list(real_stage1[0]) for r in stage1)
    assert stage1_text.startswith("[\n  {\n    \"id\": ") and not stage1_text.endswith("\n")
    assert [(r["id"], r["image"]) for r in stage1] == [(r["id"], r["images"][0]) for r in rows]
    for r, rec in zip(rows, stage1):
        assert r["text"] == f"<__dj__image>\n{rec['conversations'][1]['value']} <|__dj__eoc|>"
        assert (out / "seed" / r["images"][0]).is_file()


def test_eval_images_are_held_out(world):
    out, _ = world
    train = {h for k, h in tree_hashes(out / "raw").items() if k.endswith(".jpg")}
    train |= {h for k, h in tree_hashes(out / "world").items() if k.endswith(".jpg") and not k.startswith("eval")}
    held = {h for k, h in tree_hashes(out / "world/eval").items() if k.endswith(".jpg")}
    assert held and not (train & held)


def test_noise_rate_controls_wrong_or_off_topic_captions():
    def accurate_share(rate):
        ok = 0
        for i in range(400):
            rng = np.random.default_rng([9, i])
            s = sample_scene(rng)
            cap = text.web_caption(s, rng, rate)
            words = set(cap.split())
            truths = {s.word} | {o.color for o in s.objects} | {o.shape for o in s.objects} | {o.shape + "s" for o in s.objects}
            facts = words & (set(vocab.SIGN_WORDS) | set(vocab.COLORS) | set(vocab.SHAPES) | {x + "s" for x in vocab.SHAPES})
            ok += facts <= truths and cap not in text.OFF_TOPIC
        return ok / 400
    assert accurate_share(0.0) == 1.0
    assert 0.5 < accurate_share(0.35) < 0.8


def test_human_answers_vary_but_a_majority_agrees():
    variation = 0
    for i in range(100):
        rng = np.random.default_rng([5, i])
        qa = text.textvqa_item(sample_scene(rng), rng)
        assert Counter(qa["answers"])[qa["answer"]] >= 5
        variation += len(set(qa["answers"])) > 1
    assert variation > 60


def test_mmbench_answer_letter_points_at_the_truth():
    for i in range(50):
        rng = np.random.default_rng([6, i])
        s = sample_scene(rng)
        item = text.mmbench_item(s, rng)
        right = item[item["answer"]]
        assert len({item[k] for k in "ABCD"}) == 4
        if item["category"] == "ocr":
            assert right == s.word
        if item["category"] == "count":
            assert right == str(s.count)


def sign_band(img: Image.Image, sign_side: str) -> np.ndarray:
    """Per-pixel R+G+B of the rows the sign's band covers."""
    a = np.asarray(img).astype(int).sum(-1)
    n = round(SIGN_BAND * a.shape[0])
    return a[:n] if sign_side == "top" else a[-n:]


def test_sign_letters_are_dark_at_96px_and_washed_out_at_32px():
    """Pixels of 20 scenes: at the stored 96 px the letters are near-black (text fill (15, 15, 15))
    and 6-10 rows tall; at 32 px, rendered directly or resized from 96 px as the low-res tower
    sees it (labels.labelled_images), no letter pixel is darker than mid-grey."""
    outline = 3 * 60   # the sign's frame, (60, 60, 60): not a letter
    for i in range(20):
        s = sample_scene(np.random.default_rng(i))
        band = sign_band(render(s, 96), s.sign_side)
        dark = (band < 150).any(1).nonzero()[0]   # rows holding the black letters
        assert len(dark) and 6 <= dark.max() - dark.min() + 1 <= 10, (i, s.word)
        direct = sign_band(render(s, 32), s.sign_side)
        assert direct[direct != outline].min() > 300, (i, s.word)
        resized = sign_band(render(s, 96).resize((32, 32), Image.BICUBIC), s.sign_side)
        assert resized.min() > 300, (i, s.word)


def test_labels_cover_their_classes():
    images, labels = labelled_images(64, seed=0, size=32)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    assert set(labels) == set(NUM_CLASSES)
    for k, v in labels.items():
        assert v.min() >= 0 and v.max() < NUM_CLASSES[k]
    s = sample_scene(np.random.default_rng(1))
    assert vocab.SIGN_WORDS[scene_labels(s)["word"]] == s.word
    again, _ = labelled_images(4, seed=0, size=32)
    assert np.array_equal(again, images[:4])


def test_world_text_corpus_is_seeded():
    a, b = world_text_corpus(50, seed=0), world_text_corpus(50, seed=0)
    assert a == b and len(a) == 50 and a != world_text_corpus(50, seed=1)


def test_world_chat_corpus_is_seeded_chat_rounds_half_of_them_short_answer():
    a = world_chat_corpus(400, seed=0)
    assert a == world_chat_corpus(400, seed=0) and len(a) == 400 and a != world_chat_corpus(400, seed=1)
    assert all(t.startswith(f"{START_OF_TURN}user\n") and t.endswith(f"{END_OF_TURN}\n") for t in a)
    assert sum(text.SHORT_ANSWER in t for t in a) == 200  # each scene: a short answer, then a caption or MC


def test_empty_sets_are_written_as_empty_files(tmp_path):
    params = {"seed": 0, "world": {**TINY["world"], "raw_size": 2, "curated_size": 0, "instruct_size": 0,
                                   "eval_textvqa": 0, "eval_caption": 0, "eval_mmbench": 0, "workers": 1}}
    counts = build_world(None, tmp_path, params)
    assert counts == {"curated": 0, "instruct": 0, "eval_textvqa": 0, "eval_caption": 0, "eval_mmbench": 0}
    assert (tmp_path / "curated/dj.jsonl").read_text() == "" and json.loads((tmp_path / "instruct/llava.json").read_text()) == []
    assert (tmp_path / "eval/mmbench.tsv").read_text().count("\n") == 1   # header only
