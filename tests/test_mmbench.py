import base64
import io
import json
from collections import defaultdict

import pytest
from PIL import Image

from vlmlab.evaluate import readers
from vlmlab.evaluate.mmbench import (GROUP, build_prompt, expand_rotations, extract_choice, group_outcomes,
                                     rotate_options, score)
from vlmlab.io import StageError

OPTS = {"A": "red cube", "B": "blue sphere", "C": "green cone", "D": "none of these"}


def fixture_groups(fixtures_dir):
    groups = defaultdict(list)
    for line in open(fixtures_dir / "mmbench/llava-v1.5-13b_mmbench_dev_20230712_first100groups.jsonl"):
        r = json.loads(line)
        groups[r["question_id"] % GROUP].append(r)
    return {k: sorted(v, key=lambda r: r["question_id"]) for k, v in groups.items()}


@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("(C)", "C"), ("D.", "D"), ("A", "A"), ("Answer: B", "B"), ("The answer is C.", "C"),
    ("blue sphere", "B"), ("It is a blue sphere.", "B"), ("None of these", "D"),
    ("b", "B"), ("(c)", "C"), ("a", "A"), ("answer: d", "D"),  # lower-cased letters (a lower-casing tokenizer)
    ("A dog is running.", None),          # the article, not a choice
    ("a dog", None),
    ("red cube or blue sphere", None),    # two options named: no choice
    ("", None), ("E", None),
])
def test_extract_choice(text, want):
    assert extract_choice(text, OPTS) == want


def test_rotation_direction_matches_legacy_tsv(fixtures_dir):
    groups = fixture_groups(fixtures_dir)
    assert len(groups) == 100 and sorted(len(g) for g in groups.values()).count(3) == 2
    for rows in groups.values():
        n = len(rows)  # group size from rows, not len(options): groups 34 and 51 keep D fixed
        for k, r in enumerate(rows):
            assert r["question_id"] // GROUP == k
            assert r["options"] == rotate_options(rows[0]["options"], k, n)
    assert rotate_options(["a", "b", "c", "d"], 1, 3) == ["c", "a", "b", "d"]


def test_circular_scoring_on_fixture(fixtures_dir):
    """Ground truth supplied by the test: the option text LLaVA-13B chose in rotation 0.

    Single-pass accuracy is then 1 by construction; circular accuracy is the share of
    questions whose chosen text stays the same in every rotation.
    """
    rows, consistent, cats = [], 0, {}
    for idx, group in fixture_groups(fixtures_dir).items():
        letters = group[0]["option_char"]
        truth = group[0]["options"][letters.index(group[0]["text"])]
        chosen = []
        for r in group:
            opts = dict(zip(r["option_char"], r["options"]))
            pred = extract_choice(r["text"], opts)
            chosen.append(opts[pred])
            rows.append({"index": r["question_id"], "category": "odd" if idx % 2 else "even",
                         "answer": r["option_char"][r["options"].index(truth)], "pred": pred})
        consistent += all(c == truth for c in chosen)
    s = score(rows)
    assert s["questions"] == 100 and s["acc"] == 1.0
    assert s["circular_acc"] == consistent / 100 < 1.0
    assert s["by_category"]["odd"]["questions"] + s["by_category"]["even"]["questions"] == 100


def test_one_wrong_rotation_fails_the_question():
    base = [{"index": 7, "options": dict(OPTS), "answer": "B", "category": "color"},
            {"index": 8, "options": dict(OPTS), "answer": "A", "category": "shape"}]
    rows = expand_rotations(base)
    assert [r["index"] for r in rows] == [7, 1_000_007, 2_000_007, 3_000_007, 8, 1_000_008, 2_000_008, 3_000_008]
    assert [r["answer"] for r in rows[:4]] == ["B", "C", "D", "A"]  # "blue sphere" moves one place each rotation
    for r in rows:
        r["pred"] = r["answer"]
    assert score(rows)["circular_acc"] == 1.0
    rows[2]["pred"] = "A"  # question 7, rotation 2 wrong
    s = score(rows)
    assert s["acc"] == 1.0 and s["circular_acc"] == 0.5 and s["row_acc"] == 7 / 8
    assert s["by_category"]["color"] == {"acc": 1.0, "circular_acc": 0.0, "questions": 1}
    assert s["by_category"]["shape"]["circular_acc"] == 1.0


def test_prompt_layout():
    p = build_prompt("What shape?", {"A": "cube", "B": "cone"}, hint="Look left.")
    assert p == "Look left.\nWhat shape?\nA. cube\nB. cone\nAnswer with the option's letter from the given choices directly."


def test_tsv_reader(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="JPEG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
                   f"3\tWhat colour?\tnan\tred\tblue\tgreen\t\tA\tcolor\t{b64}\n")
    (row,) = readers.read_mmbench_tsv(tsv)
    assert row["index"] == 3 and row["options"] == {"A": "red", "B": "blue", "C": "green"} and row["hint"] == ""
    assert readers.decode_image(row["image"]).size == (4, 4)
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tquestion\n1\tq\n")
    with pytest.raises(StageError, match="lacks column"):
        readers.read_mmbench_tsv(bad)


def test_group_outcomes_keep_every_rotation_of_a_question_together():
    """The bootstrap's MMBench unit is the question: its rotations are one unit, never split."""
    from vlmlab.evaluate.items import mmbench_statistics
    from vlmlab.evaluate.bootstrap import point

    base = [{"index": i, "options": dict(OPTS), "answer": "B", "category": "color"} for i in (7, 8, 9)]
    rows = expand_rotations(base)
    for r in rows:
        r["pred"] = r["answer"]
    rows[5]["pred"] = "A"  # question 8, rotation 1 wrong: right single-pass, wrong circular
    rows[8]["pred"] = "A"  # question 9, rotation 0 wrong
    groups = group_outcomes(rows)
    assert [(g["group"], g["first"], g["circular"]) for g in groups] == [(7, True, True), (8, True, False), (9, False, False)]
    stats = mmbench_statistics(rows)
    assert stats["mmbench_acc"].keys == [7, 8, 9]  # 3 units, not 12 rows
    s = score(rows)
    assert point(stats["mmbench_acc"]) == s["acc"] == 2 / 3
    assert point(stats["mmbench_circular_acc"]) == s["circular_acc"] == 1 / 3
