import json

import pytest

from vlmlab.evaluate import readers
from vlmlab.evaluate.textvqa import normalize_answer, question_from_prompt, score_predictions, soft_score
from vlmlab.io import StageError


def load(path):
    return [json.loads(l) for l in open(path)]


def test_fixture_first30_reproduces_m4c_scores(fixtures_dir):
    rows = load(fixtures_dir / "textvqa/textvqa_val_first30_secondary.jsonl")
    for r in rows:  # exact equality: the same floats as mmf/LLaVA's m4c evaluator, to the last digit
        assert soft_score(r["pred_llava15_13b"], r["answers"]) == r["m4c_score_13b"], r["row"]
        assert soft_score(r["pred_llava15_7b_noocr_audit"], r["answers"]) == r["m4c_score_7b"], r["row"]
    assert soft_score(rows[10]["pred_llava15_13b"], rows[10]["answers"]) == 1.0  # "Off" vs "off" x10
    assert soft_score("$1.99", rows[13]["answers"]) == 0.0


def test_llava_files_join_and_score_through_readers(fixtures_dir, tmp_path):
    """The real LLaVA answer file joined to a TextVQA_0.5.1 layout built from the secondary table."""
    rows = load(fixtures_dir / "textvqa/textvqa_val_first30_secondary.jsonl")
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"data": [{"question_id": 34602 + i, "image_id": r["image_id"], "question": r["question"],
                                         "answers": r["answers"]} for i, r in enumerate(rows)]}))
    answers = load(fixtures_dir / "textvqa/llava-v1.5-13b_textvqa_val_answers.head200.jsonl")[:30]
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(a) + "\n" for a in answers))
    scores = score_predictions(readers.read_predictions(pred), readers.read_textvqa_annotations(ann))
    assert scores == [r["m4c_score_13b"] for r in rows]
    five = load(fixtures_dir / "textvqa/textvqa_val_first5_with_answers.jsonl")  # answers with trailing spaces
    assert [soft_score(r["llava15_13b_pred"], r["answers"]) for r in five] == scores[:5]


def test_questions_file_parses(fixtures_dir):
    qs = readers.read_textvqa_questions(fixtures_dir / "textvqa/llava_textvqa_val_v051_ocr.head200.jsonl")
    assert len(qs) == 200 and len({q["question_id"] for q in qs}) == 126  # image ids repeat: never join on them alone
    assert question_from_prompt(qs[0]["text"]) == "what is the brand of this camera?"
    assert question_from_prompt("What colour?\nAnswer the question using a single word or phrase.") == "what colour?"
    assert question_from_prompt("Reference OCR token: A, B\nWhat is it?\nAnswer briefly.") == "what is it?"


@pytest.mark.parametrize("raw, norm", [
    ("The  Two DOGS!", "2 dogs"),         # case, article, number word, mark touching nothing -> space
    ("dont", "don't"),                    # contraction restored
    ("a cat's toy", "cat 's toy"),        # 's split off
    ("3.82", "3.82"), ("3.82.", "3.82"),  # decimal point kept, final period dropped
    ("$3.82", "$3.82"),                   # $ is not in EvalAI's punctuation list
    ("black-and-white", "black and white"),  # hyphen inside a word -> space
    ("yes - no", "yes no"),               # mark touching a space -> deleted
    ("1,000", "1000"),                    # commas always go
    ("none", "0"), ("an apple", "apple"),
    ("Hello\tWorld\n", "hello world"),
])
def test_normalisation_hand_cases(raw, norm):
    assert normalize_answer(raw) == norm


def test_soft_accuracy_hand_cases():
    # k of 10 humans agree -> mean over 10 leave-one-out sets of min(1, matches/3):
    # k=1: 9 sets see 1 match -> 9/3/10 = 0.3; k=2: (2*1/3 + 8*2/3)/10 = 0.6; k=3: (3*2/3 + 7)/10 = 0.9; k>=4: 1.
    for k, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["stop"] * k + ["go"] * (10 - k)
        assert soft_score("Stop.", answers) == pytest.approx(want, abs=1e-12)
    assert soft_score("the stop", ["stop "] * 10) == 1.0  # both sides normalised


def test_bad_prediction_files_fail_clearly(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(StageError, match="empty.jsonl: prediction file is empty"):
        readers.read_predictions(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "te\n')
    with pytest.raises(StageError, match="broken.jsonl:2: prediction line is not valid JSON"):
        readers.read_predictions(broken)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"question_id": 1}\n')
    with pytest.raises(StageError, match="nokey.jsonl:1: prediction line lacks text"):
        readers.read_predictions(nokey)
    with pytest.raises(StageError, match="no such prediction file"):
        readers.read_predictions(tmp_path / "absent.jsonl")
    bad_ann = tmp_path / "ann.json"
    bad_ann.write_text('{"questions": []}')
    with pytest.raises(StageError, match="not a TextVQA annotation file"):
        readers.read_textvqa_annotations(bad_ann)


def test_unjoinable_prediction_is_named():
    with pytest.raises(KeyError, match="has no annotation"):
        score_predictions([{"question_id": "x", "prompt": "q?\nAnswer.", "text": "a"}],
                          [{"image_id": "y", "question": "q?", "answers": ["a"] * 10}])


def test_per_question_statistic_is_the_accuracy_and_keys_repeated_questions_apart(fixtures_dir):
    """Bootstrap units are questions; LLaVA's question_id is the image id, so the key adds prompt and repeat."""
    from vlmlab.evaluate.bootstrap import point
    from vlmlab.evaluate.items import textvqa_statistics

    rows = load(fixtures_dir / "textvqa/textvqa_val_first30_secondary.jsonl")
    preds = [{"question_id": r["image_id"], "prompt": r["question"], "score": r["m4c_score_13b"]} for r in rows]
    stat = textvqa_statistics(preds + preds[:1])["textvqa_acc"]
    assert len(set(stat.keys)) == 31 and stat.keys[30][2] == 1  # the repeated question is a second unit
    assert point(textvqa_statistics(preds)["textvqa_acc"]) == pytest.approx(sum(r["m4c_score_13b"] for r in rows) / 30)
