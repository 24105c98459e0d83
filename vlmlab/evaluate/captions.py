"""Caption metrics: BLEU-1..4 and CIDEr-D through pycocoevalcap 1.2's own scorers.

pycocoevalcap first tokenises with Stanford's PTBTokenizer (a Java jar) and then drops
punctuation tokens. Java is not something this pipeline may assume, so `ptb_tokenize`
re-does that step in Python, the way PTBTokenizer 3.4.1 (`-preserveLines -lowerCase`)
tokenises, quirks included: brackets become "-lrb-"/"-rrb-"... which survive the
punctuation filter because it lists them upper-case. It is checked token for token against
the jar on the COCO fixture's captions (tests/test_captions.py, where Java is present).
What it does not model (rare in captions): PTB's full abbreviation list, SGML/URL/e-mail
tokens, emoticons.

The scores themselves are pycocoevalcap's `Bleu(4)` (corpus BLEU, "closest" reference
length) and `Cider()` (CIDEr-D: sigma 6, clipped counts, x10), with document frequencies
taken from the evaluated reference set, as pycocoevalcap computes them.
"""
from __future__ import annotations

import re

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

# pycocoevalcap's ptbtokenizer.PUNCTUATIONS, as it filters the jar's (lower-cased) output;
# plus '"', which the jar would have turned into `` or '' (both dropped).
DROPPED = {'"', "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# PTB splits these words in two ("cannot" -> "can not", "gonna" -> "gon na").
SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
               "lemme": "lem me", "gimme": "gim me", "'tis": "'t is", "'twas": "'t was"}
ABBREVIATIONS = "ave|blvd|rd|mr|mrs|ms|dr|prof|jr|sr|st|vs|etc|mt|inc|ltd|co|corp|jan|feb|mar|apr|aug|sep|sept|oct|nov|dec"
_TOKEN = re.compile(
    r"\d+\xa0\d+/\d+"                                        # mixed fraction, joined by PTB with a no-break space
    r"|(?:[^\W\d_]\.){2,}"                                  # acronyms: u.s. p.m. i.d.
    r"|<[^<>\s]+>|@[^\W_]+"                                  # <tag>, @name: PTB keeps them whole
    rf"|(?:{ABBREVIATIONS})\.(?=\s|$)"                        # mr. dr. st.
    r"|n't|'(?:s|re|ve|ll|d|m)\b"                            # clitics split off their word
    r"|\d+(?:[.,:]\d+)+(?:-[^\W_]+)*"                         # 3.5  1,000-piece  5:30
    r"|[^\W_]+(?:['\-/&][^\W_]+)*"                    # words: black-and-white, yes/no, o'clock
    r"|\.\.\.|--|\S",                                        # ellipsis, dash, any other single mark
    re.UNICODE,
)
_CLITIC = re.compile(r"(?<=[^\W_])(n't|'(?:s|re|ve|ll|d|m))\b", re.UNICODE)
_FRACTION = re.compile(r"(?<=\d) (?=\d+/\d+)")
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


def ptb_tokenize(caption: str) -> str:
    """`"A man's (red) hat."` -> `"a man 's -lrb- red -rrb- hat"`, as pycocoevalcap's PTBTokenizer."""
    text = caption.replace("\n", " ").translate(_QUOTES).lower()
    text = _CLITIC.sub(r" \1", text)  # "don't" -> "do n't", "cat's" -> "cat 's"
    text = " ".join(SPLIT_WORDS.get(w, w) for w in text.split())
    text = _FRACTION.sub("\xa0", text)  # "22 3/4" is one PTB token
    tokens = [BRACKETS.get(t, t) for t in _TOKEN.findall(text)]
    return " ".join(t for t in tokens if t not in DROPPED)


def caption_scores(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of one predicted caption per id against that id's references.

    Only ids in `preds` are scored (and their references make CIDEr-D's document frequencies);
    each needs at least one reference. Returns {"bleu_1", ..., "bleu_4", "cider"}.
    """
    if not preds:
        raise ValueError("caption_scores: no predictions to score")
    missing = [i for i in preds if not refs.get(i)]
    if missing:
        raise ValueError(f"caption_scores: {len(missing)} predicted ids have no references, e.g. {missing[0]!r}")
    res = {i: [ptb_tokenize(preds[i])] for i in preds}
    gts = {i: [ptb_tokenize(r) for r in refs[i]] for i in preds}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu_{n}": float(b) for n, b in enumerate(bleu, 1)}, "cider": float(cider)}
