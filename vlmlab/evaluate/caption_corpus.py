"""BLEU-4 and CIDEr-D of a resampled set of caption images, for the bootstrap.

Both are corpus metrics, so a resample is scored as a corpus, not by averaging
per-image scores:
- BLEU sums clipped n-gram matches, n-gram counts and lengths over the corpus before
  taking precisions and the brevity penalty: it is a function of count-weighted sums of
  per-image statistics (pycocoevalcap's own `cook_test`, "closest" reference length).
- CIDEr-D weights every n-gram by idf = log(N) - log(max(1, df)), df = the number of
  images whose references contain it. A resample changes df (an image drawn twice counts
  twice), so every image's score changes with it: per-image CIDEr-D from the full set,
  averaged, would be a different statistic. Because idf >= 0, min(h*idf, r*idf) =
  idf*min(h, r), and every term pycocoevalcap sums (numerator, both norms) is linear in
  idf^2: a sparse matrix of fixed n-gram counts times idf^2 per resample. The full set
  gives pycocoevalcap's `Cider()` (tests/test_bootstrap.py checks both, and a resample with
  repeated images against pycocoevalcap on the repeated corpus).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test
from pycocoevalcap.cider.cider_scorer import precook

from vlmlab.evaluate.captions import ptb_tokenize

CHUNK = 128  # resamples per block: keeps (nonzeros x block) products a few MB


class _Sparse:
    """A count matrix M (rows x cols) from (row, col, value) triples; `dot(X)` = M @ X for X (cols, B).

    No BLAS: products are elementwise and sums run in a fixed order (bincount), so the
    result does not depend on which kernels the CPU selects. Resamples run along the last
    axis, so gathering X's rows reads contiguous memory.
    """

    def __init__(self, rows: list[int], cols: list[int], vals: list[float], n_rows: int):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.cols = np.asarray(cols, dtype=np.int64)
        self.vals = np.asarray(vals, dtype=np.float64)[:, None]
        self.n_rows = n_rows
        self._slots: dict[int, np.ndarray] = {}

    def dot(self, dense: np.ndarray) -> np.ndarray:
        b = dense.shape[1]
        if b not in self._slots:  # output cell of every (nonzero, resample) product
            self._slots[b] = (self.rows[:, None] * b + np.arange(b)).ravel()
        weights = (dense[self.cols] * self.vals).ravel()
        return np.bincount(self._slots[b], weights, minlength=self.n_rows * b).reshape(self.n_rows, b)


class CorpusCider:
    """pycocoevalcap's CIDEr-D (n = 4, sigma = 6, x10) of the count-weighted image multiset.

    preds[i]: one tokenised caption of image keys[i]; refs[i]: its tokenised references.
    """

    def __init__(self, keys: Sequence, preds: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4,
                 sigma: float = 6.0):
        self.keys, self.n = list(keys), n
        vocab: dict[tuple, int] = {}
        df_rows, df_cols = [], []                      # n-gram x image: 1 if the image's refs hold it
        hyp = ([], [], [])                             # (image, order) x n-gram: h^2
        ref = ([], [], [])                             # (ref, order) x n-gram: r^2
        both = ([], [], [])                            # (ref, order) x n-gram: min(h, r) * r
        penalty, ref_image = [], []
        for i, (p, rs) in enumerate(zip(preds, refs)):
            h = precook(p, n)
            h_len = sum(c for g, c in h.items() if len(g) == 2)  # pycocoevalcap's "length": bigram count
            for g, c in h.items():
                _add(hyp, i * n + len(g) - 1, vocab.setdefault(g, len(vocab)), c * c)
            seen = set()
            for r_text in rs:
                r = precook(r_text, n)
                j = len(penalty)
                r_len = sum(c for g, c in r.items() if len(g) == 2)
                penalty.append(np.exp(-((h_len - r_len) ** 2) / (2 * sigma**2)))
                ref_image.append(i)
                for g, c in r.items():
                    col = vocab.setdefault(g, len(vocab))
                    seen.add(col)
                    _add(ref, j * n + len(g) - 1, col, c * c)
                    if g in h:
                        _add(both, j * n + len(g) - 1, col, min(h[g], c) * c)
            df_rows += sorted(seen)
            df_cols += [i] * len(seen)
        if not penalty:
            raise ValueError("CorpusCider: no references")
        n_img, n_ref = len(self.keys), len(penalty)
        self.df = _Sparse(df_rows, df_cols, [1.0] * len(df_rows), len(vocab))
        self.hyp = _Sparse(*hyp, n_img * n)
        self.ref = _Sparse(*ref, n_ref * n)
        self.both = _Sparse(*both, n_ref * n)
        self.penalty = np.asarray(penalty)
        self.ref_image = np.asarray(ref_image)
        if np.any(np.bincount(self.ref_image, minlength=n_img) == 0):
            raise ValueError("CorpusCider: every image needs at least one reference")
        # image i's score = 10 / (n * |refs_i|) * sum over its refs of penalty * sum over orders of cosines
        self.first_ref = np.searchsorted(self.ref_image, np.arange(n_img))   # refs are stored image by image
        self.ref_weight = 10.0 / (n * np.bincount(self.ref_image)[self.ref_image])

    def values(self, counts: np.ndarray) -> np.ndarray:
        counts = np.asarray(counts, dtype=np.float64)
        return np.concatenate([self._block(counts[s:s + CHUNK]) for s in range(0, len(counts), CHUNK)])

    def _block(self, counts: np.ndarray) -> np.ndarray:
        counts = counts.T                                               # (images, B)
        b, n = counts.shape[1], self.n
        n_docs = counts.sum(axis=0)                                     # (B,): images in each resample
        if np.any(n_docs != n_docs[0]):
            raise ValueError("CorpusCider: every resample must hold the same number of images")
        df = self.df.dot(counts).astype(np.int64)                       # (V, B): exact integer sums
        # idf^2 = (log N - log max(1, df))^2 for each possible df: a table, not V x B logarithms
        idf2_of = (np.log(n_docs[0]) - np.log(np.maximum(1.0, np.arange(int(n_docs[0]) + 1)))) ** 2
        idf2 = idf2_of[df]                                              # (V, B)
        hyp_norm = np.sqrt(self.hyp.dot(idf2)).reshape(-1, n, b)        # (images, n, B)
        ref_norm = np.sqrt(self.ref.dot(idf2)).reshape(-1, n, b)        # (refs, n, B)
        num = self.both.dot(idf2).reshape(-1, n, b)                     # (refs, n, B)
        denom = hyp_norm[self.ref_image] * ref_norm
        cos = np.where(denom != 0, num / np.where(denom != 0, denom, 1.0), num)
        per_ref = cos.sum(axis=1) * (self.penalty * self.ref_weight)[:, None]   # (refs, B)
        per_image = np.add.reduceat(per_ref, self.first_ref, axis=0)    # (images, B)
        return (counts * per_image).sum(axis=0) / n_docs


class CorpusBleu:
    """pycocoevalcap's corpus BLEU-`order` ("closest" reference length) of the count-weighted image multiset."""

    def __init__(self, keys: Sequence, preds: Sequence[str], refs: Sequence[Sequence[str]], order: int = 4):
        self.keys, self.order = list(keys), order
        rows = []
        for p, rs in zip(preds, refs):
            c = cook_test(p, cook_refs(rs, n=4))
            reflen = min((abs(length - c["testlen"]), length) for length in c["reflen"])[1]
            rows.append([c["testlen"], reflen] + c["guess"] + c["correct"])
        self.stats = np.asarray(rows, dtype=np.float64)  # (images, 2 + 4 + 4)

    def values(self, counts: np.ndarray) -> np.ndarray:
        tiny, small = 1e-15, 1e-9  # pycocoevalcap's guards, in its order of operations
        # count-weighted sums as elementwise products and fixed-order sums (no BLAS kernel choice)
        s = (np.asarray(counts, dtype=np.float64)[:, :, None] * self.stats[None]).sum(axis=1)
        test, reflen, guess, correct = s[:, 0], s[:, 1], s[:, 2:6], s[:, 6:10]
        bleu = np.ones(len(s))
        for k in range(self.order):
            bleu = bleu * (correct[:, k] + tiny) / (guess[:, k] + small)
        bleu = bleu ** (1.0 / self.order)
        ratio = (test + tiny) / (reflen + small)
        return np.where(ratio < 1, bleu * np.exp(1 - 1 / np.minimum(ratio, 1.0)), bleu)


def _add(triples: tuple[list, list, list], row: int, col: int, val: float) -> None:
    triples[0].append(row)
    triples[1].append(col)
    triples[2].append(val)


def caption_statistics(ids: Sequence, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> dict:
    """{"bleu_4": CorpusBleu, "cider": CorpusCider} of raw captions, PTB-tokenised as `caption_scores` does."""
    p = [ptb_tokenize(x) for x in preds]
    r = [[ptb_tokenize(x) for x in rs] for rs in refs]
    return {"bleu_4": CorpusBleu(ids, p, r), "cider": CorpusCider(ids, p, r)}
