import json
import math
import shutil

import pytest

from vlmlab.evaluate.captions import caption_scores, ptb_tokenize


def coco_setup(fixtures_dir):
    rows = [json.loads(l) for l in open(fixtures_dir / "coco/llava_caps_boxes_coco2014_val_80.jsonl")]
    return {r["id"]: r["captions"][0] for r in rows}, {r["id"]: r["captions"][1:] for r in rows}


def test_ptb_tokenize_hand_cases():
    assert ptb_tokenize("A man's (red) hat.") == "a man 's -lrb- red -rrb- hat"  # PTB's lower-cased brackets survive the filter
    assert ptb_tokenize("Don't, they can't!") == "do n't they ca n't"
    assert ptb_tokenize('A "red" black-and-white bike... at 5:30 p.m.') == "a red black-and-white bike at 5:30 p.m."
    assert ptb_tokenize("22 3/4 St. costs $3.82") == "22\xa03/4 st. costs $ 3.82"
    assert ptb_tokenize("two\nlines") == "two lines"


def test_bleu_hand_worked():
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0 (pycocoevalcap's 1e-15 floor), equal lengths: no brevity penalty.
    s = caption_scores({"1": "a b c d"}, {"1": ["a b c e"]})
    assert s["bleu_1"] == pytest.approx(0.75, abs=1e-8)
    assert s["bleu_2"] == pytest.approx(math.sqrt(0.75 * 2 / 3), abs=1e-8)
    assert s["bleu_3"] == pytest.approx((0.75 * 2 / 3 * 1 / 2) ** (1 / 3), abs=1e-8)
    assert s["bleu_4"] == pytest.approx((0.25 * 1e-15) ** 0.25, rel=1e-6)
    # a 2-word hypothesis against a 4-word reference: brevity penalty exp(1 - 4/2).
    s = caption_scores({"1": "a b"}, {"1": ["a b c d"]})
    assert s["bleu_1"] == pytest.approx(math.exp(-1), abs=1e-8)
    assert s["bleu_2"] == pytest.approx(math.exp(-1), abs=1e-8)


def test_cider_d_hand_worked():
    # Two images, each prediction equal to its only reference: unigram and bigram cosines are 1,
    # there are no 3/4-grams, so CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4.
    refs = {"1": ["red square"], "2": ["blue circle"]}
    assert caption_scores({"1": "Red square.", "2": "blue circle"}, refs)["cider"] == pytest.approx(5.0)
    # One image: every n-gram is in every document, idf = log(1/1) = 0, so CIDEr-D is 0 however good.
    assert caption_scores({"1": "red square"}, {"1": ["red square"]})["cider"] == 0.0
    # Document frequencies come from the evaluated references only: adding an unscored id changes nothing.
    more = {**refs, "3": ["red square"]}
    assert caption_scores({"1": "red square", "2": "blue circle"}, more)["cider"] == pytest.approx(5.0)


def test_coco_fixture_pred_first_vs_rest(fixtures_dir):
    """pred = captions[0], refs = captions[1:]: pycocoevalcap 1.2 with the Java PTBTokenizer gives these."""
    preds, refs = coco_setup(fixtures_dir)
    s = caption_scores(preds, refs)
    expected = {"bleu_1": 0.6326530612237303, "bleu_2": 0.43187872048198306, "bleu_3": 0.2724857546703227,
                "bleu_4": 0.16551976034727686, "cider": 0.9532002086572927}
    for k, v in expected.items():
        assert s[k] == pytest.approx(v, abs=1e-12), k


@pytest.mark.skipif(shutil.which("java") is None, reason="java absent: the jar comparison needs it")
def test_tokenizer_matches_java_ptb_on_coco(fixtures_dir):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds, refs = coco_setup(fixtures_dir)
    caps = list(preds.values()) + [c for v in refs.values() for c in v]
    java = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(caps)})
    assert [ptb_tokenize(c) for c in caps] == [java[str(i)][0] for i in range(len(caps))]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="no predictions"):
        caption_scores({}, {"1": ["x"]})
    with pytest.raises(ValueError, match="no references"):
        caption_scores({"1": "x", "2": "y"}, {"1": ["x"]})


def test_per_image_statistics_reproduce_the_corpus_scores(fixtures_dir):
    """Caption units are images; their resampled statistic at the full set is the stage's BLEU-4 / CIDEr-D."""
    from vlmlab.evaluate.bootstrap import point
    from vlmlab.evaluate.items import caption_item_statistics

    preds, refs = coco_setup(fixtures_dir)
    rows = [{"id": i, "text": preds[i], "references": refs[i]} for i in preds]
    stats = caption_item_statistics(rows)
    s = caption_scores(preds, refs)
    assert point(stats["cider"]) == pytest.approx(s["cider"], rel=1e-12)
    assert point(stats["bleu_4"]) == pytest.approx(s["bleu_4"], rel=1e-12)
    assert stats["cider"].keys == [str(i) for i in preds]
