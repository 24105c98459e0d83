"""DJ jsonl <-> LLaVA json on the real challenge lines, and both recaptioned text layouts."""
import json

import pytest

from vlmlab.data.formats import (FormatError, caption_of, dj_text, dj_to_llava, llava_to_dj, pool_prompt,
                                 prompts_by_id, read_llava, write_llava)
from vlmlab.sim.text import CAPTION_PROMPTS


@pytest.fixture(scope="module")
def seed_lines(fixtures_dir):
    return (fixtures_dir / "better_synth/mgm_pretrain_stage_1_10k.head300.jsonl").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def stage1(fixtures_dir):
    return read_llava(fixtures_dir / "better_synth/stage_1.subset.json")


def test_dj_to_llava_restores_prompts_exactly_as_data_juicer(seed_lines, stage1, fixtures_dir, tmp_path):
    rows = [json.loads(line) for line in seed_lines]
    records = dj_to_llava(rows, prompts_by_id(stage1))
    assert records == stage1
    write_llava(tmp_path / "llava.json", records)   # upstream's serialisation, byte for byte
    assert (tmp_path / "llava.json").read_bytes() == (fixtures_dir / "better_synth/stage_1.subset.json").read_bytes()


def test_llava_to_dj_gives_back_the_original_lines(seed_lines, stage1):
    rows = llava_to_dj(stage1)
    assert [json.dumps(r, ensure_ascii=False) for r in rows] == seed_lines
    assert all(r["images"][0] == s["image"] for r, s in zip(rows, stage1))


def test_round_trip_without_stage1_uses_a_seeded_pool(seed_lines):
    rows = [json.loads(line) for line in seed_lines]
    a, b = dj_to_llava(rows, seed=0), dj_to_llava(list(reversed(rows)), seed=0)
    assert a == list(reversed(b))                       # a prompt depends on the id, not the order
    prompts = {r["conversations"][0]["value"] for r in a}
    assert prompts <= {f"<image>\n{p}" for p in CAPTION_PROMPTS} and len(prompts) == len(CAPTION_PROMPTS)
    assert dj_to_llava(rows, seed=1) != a
    assert llava_to_dj(a) == rows
    assert pool_prompt("006092514", 0) == a[0]["conversations"][0]["value"]


def test_both_recaptioned_layouts_parse_to_the_same_caption(fixtures_dir):
    trace = fixtures_dir / "better_synth/dj_trace_mapper-image_captioning_mapper.head50.jsonl"
    pairs = [json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines()]
    assert caption_of(pairs[0]["processed_text"]) == "a baby shower favor boxes in pink"
    for p in pairs:
        for key in ("original text", "processed_text"):
            cap = caption_of(p[key])
            assert cap == cap.strip() and "__dj__" not in cap
            assert caption_of(dj_text(cap)) == cap
            other_layout = f"<__dj__image> {cap}\n <|__dj__eoc|>"
            assert caption_of(other_layout) == cap


@pytest.mark.parametrize("text, reason", [
    ("a cat <|__dj__eoc|>", "missing_image_token"),
    ("<__dj__image>\na cat", "missing_eoc_token"),
    ("<__dj__image>\n  <|__dj__eoc|>", "empty_caption"),
])
def test_broken_texts_name_their_reason(text, reason):
    with pytest.raises(FormatError) as e:
        caption_of(text)
    assert e.value.reason == reason


def test_multi_round_records_are_refused_by_llava_to_dj():
    rec = {"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                          {"from": "gpt", "value": "a"}] * 2}
    with pytest.raises(FormatError):
        llava_to_dj([rec])
