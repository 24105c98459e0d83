import json

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vlmlab.evaluate.bootstrap import Mean, contrast, interval, percentile_interval, point, resample_counts
from vlmlab.evaluate.caption_corpus import CorpusBleu, CorpusCider, caption_statistics
from vlmlab.evaluate.captions import caption_scores, ptb_tokenize


def test_resample_counts_are_seeded_draws_with_replacement():
    c = resample_counts(5, 400, seed=3)
    assert c.shape == (400, 5) and (c.sum(axis=1) == 5).all() and c.min() >= 0
    assert (c == resample_counts(5, 400, seed=3)).all() and not (c == resample_counts(5, 400, seed=4)).all()
    # each unit is drawn n * 1/n = 1 time per resample on average; all-ones rows are rare (5!/5^5 = 3.8%)
    assert c.mean() == pytest.approx(1.0, abs=0.05)
    assert 0.01 < (c == 1).all(axis=1).mean() < 0.08


def test_mean_interval_hand_computed():
    stat = Mean(["a", "b", "c"], [0.0, 1.0, 1.0])
    counts = np.array([[3, 0, 0], [0, 3, 0], [1, 1, 1], [2, 0, 1]])
    # resample means: 0, 1, 2/3, 1/3
    np.testing.assert_allclose(stat.values(counts), [0.0, 1.0, 2 / 3, 1 / 3])
    assert point(stat) == pytest.approx(2 / 3)
    # sorted [0, 1/3, 2/3, 1]; 25th percentile at position 0.75 -> 0.25, 75th at 2.25 -> 2/3 + 0.25/3 = 0.75
    iv = interval(stat, counts, level=0.5)
    assert (iv.value, iv.ci_low, iv.ci_high) == pytest.approx((2 / 3, 0.25, 0.75))
    assert iv.called  # [0.25, 0.75] excludes 0
    assert percentile_interval(np.array([-1.0, 1.0]), 0.95) == pytest.approx((-0.95, 0.95))
    with pytest.raises(ValueError, match="level"):
        percentile_interval(np.array([1.0]), 95)


def test_mean_interval_matches_the_exact_bootstrap_distribution():
    # Two units scored 0 and 1: the resampled mean is 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4,
    # so its 20th percentile is 0 and... the central 40% interval is [1/2, 1/2] exactly.
    stat = Mean([0, 1], [0.0, 1.0])
    vals = stat.values(resample_counts(2, 20000, seed=0))
    assert np.mean(vals == 0.5) == pytest.approx(0.5, abs=0.02)
    assert percentile_interval(vals, 0.4) == (0.5, 0.5)
    assert percentile_interval(vals, 0.95) == (0.0, 1.0)


def _coco(fixtures_dir):
    rows = [json.loads(line) for line in open(fixtures_dir / "coco/llava_caps_boxes_coco2014_val_80.jsonl")]
    ids = [str(r["id"]) for r in rows]
    return ids, [ptb_tokenize(r["captions"][0]) for r in rows], [[ptb_tokenize(c) for c in r["captions"][1:]] for r in rows]


def test_corpus_metrics_equal_pycocoevalcap_on_the_full_set_and_on_a_resample(fixtures_dir):
    ids, preds, refs = _coco(fixtures_dir)
    cider, bleu = CorpusCider(ids, preds, refs), CorpusBleu(ids, preds, refs)
    gts, res = dict(zip(ids, refs)), {i: [p] for i, p in zip(ids, preds)}
    assert point(cider) == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
    assert point(bleu) == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3], rel=1e-12)
    # A resample repeats some images and drops others: it is scored as that corpus, the repeated
    # references counting again in CIDEr-D's document frequencies (pycocoevalcap on the same multiset).
    counts = resample_counts(len(ids), 2, seed=5)
    for row in counts:
        g = {f"{ids[i]}#{k}": refs[i] for i in range(len(ids)) for k in range(row[i])}
        r = {f"{ids[i]}#{k}": [preds[i]] for i in range(len(ids)) for k in range(row[i])}
        assert cider.values(row[None])[0] == pytest.approx(Cider().compute_score(g, r)[0], rel=1e-12)
        assert bleu.values(row[None])[0] == pytest.approx(Bleu(4).compute_score(g, r, verbose=0)[0][3], rel=1e-12)
    # ... which is not the mean of the full set's per-image scores over the resample
    _, per_image = Cider().compute_score(gts, res)
    assert abs(cider.values(counts[:1])[0] - counts[0] @ per_image / len(ids)) > 1e-4


def test_caption_statistics_tokenise_as_caption_scores():
    refs = {"1": ["A red square.", "a red square on the left"], "2": ["Blue circle!", "a big blue circle"],
            "3": ["green triangle", "a small green triangle"]}
    preds = {"1": "a red square", "2": "a blue square", "3": "green triangle, small"}
    ids = list(refs)
    stats = caption_statistics(ids, [preds[i] for i in ids], [refs[i] for i in ids])
    want = caption_scores(preds, refs)
    assert point(stats["cider"]) == pytest.approx(want["cider"], rel=1e-12)
    assert point(stats["bleu_4"]) == pytest.approx(want["bleu_4"], rel=1e-12)


def _two_models(n=300, changed=0, seed=1):
    rng = np.random.default_rng(seed)
    a = (rng.random(n) < 0.4).astype(float)
    b = a.copy()
    wrong = np.flatnonzero(a == 0)[:changed]
    b[wrong] = 1.0  # b answers `changed` more questions right, everything else equal
    keys = list(range(n))
    return {"a": Mean(keys, a), "b": Mean(keys, b)}


def test_paired_difference_detects_a_planted_gain_and_not_identical_predictions():
    counts = resample_counts(300, 1000, seed=0)
    same = _two_models(changed=0)
    iv = contrast(same, {"b": 1.0, "a": -1.0}, counts, 0.95)
    assert (iv.value, iv.ci_low, iv.ci_high) == (0.0, 0.0, 0.0) and not iv.called
    planted = _two_models(changed=15)  # +5 points on 300 questions
    iv = contrast(planted, {"b": 1.0, "a": -1.0}, counts, 0.95)
    assert iv.value == pytest.approx(0.05) and iv.called and iv.ci_low > 0
    # The same gain judged from two unpaired intervals would overlap: pairing is what sees it.
    ia, ib = interval(planted["a"], counts, 0.95), interval(planted["b"], counts, 0.95)
    assert ib.ci_low < ia.ci_high


def test_paired_difference_with_gains_and_losses_that_cancel_is_not_called():
    rng = np.random.default_rng(2)
    a = (rng.random(300) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:10]] = 1.0  # 10 gains ...
    b[np.flatnonzero(a == 1)[:10]] = 0.0  # ... and 10 losses
    iv = contrast({"a": Mean(range(300), a), "b": Mean(range(300), b)}, {"b": 1, "a": -1},
                  resample_counts(300, 1000, seed=0), 0.95)
    assert iv.value == 0.0 and iv.ci_low < 0 < iv.ci_high and not iv.called


def test_paired_cider_difference(fixtures_dir):
    ids, preds, refs = _coco(fixtures_dir)
    counts = resample_counts(len(ids), 300, seed=0)
    base = CorpusCider(ids, preds, refs)
    same = CorpusCider(ids, list(preds), refs)
    iv = contrast({"a": base, "b": same}, {"b": 1, "a": -1}, counts, 0.95)
    assert (iv.ci_low, iv.ci_high) == (0.0, 0.0) and not iv.called
    # b copies a reference for every fourth image: a real gain, called
    better = [r[0] if i % 4 == 0 else p for i, (p, r) in enumerate(zip(preds, refs))]
    iv = contrast({"a": base, "b": CorpusCider(ids, better, refs)}, {"b": 1, "a": -1}, counts, 0.95)
    assert iv.value > 0.1 and iv.called


def test_contrast_refuses_models_scored_on_different_items():
    with pytest.raises(ValueError, match="same items"):
        contrast({"a": Mean([1, 2], [0, 1]), "b": Mean([1, 3], [0, 1])}, {"a": 1, "b": -1},
                 resample_counts(2, 10, 0), 0.95)


def test_blind_control_difference_hand_computed():
    from vlmlab.evaluate.blind import seeing_minus_blind

    keys = [(str(i), "q", 0) for i in range(200)]
    seen = {"textvqa_acc": Mean(keys, [1.0] * 60 + [0.0] * 140)}
    blind = {"textvqa_acc": Mean(keys, [1.0] * 20 + [0.0] * 180)}  # the first 20 right either way
    out = seeing_minus_blind(seen, blind, 1000, 0, 0.95)
    assert out["textvqa_acc_blind"] == pytest.approx(0.1) and out["textvqa_acc_minus_blind"] == pytest.approx(0.2)
    assert 0 < out["textvqa_acc_minus_blind_ci_low"] < 0.2 < out["textvqa_acc_minus_blind_ci_high"]
    same = seeing_minus_blind(seen, seen, 1000, 0, 0.95)
    assert (same["textvqa_acc_minus_blind"], same["textvqa_acc_minus_blind_ci_low"],
            same["textvqa_acc_minus_blind_ci_high"]) == (0.0, 0.0, 0.0)
