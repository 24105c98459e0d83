"""Closed vocabularies of the tiny world, and the one word list every world text is drawn from.

Everything a scene can hold is listed here; the text templates live in `text.py`.
`corpus_words()` is what a word-level tokenizer is trained on: it is derived from these
lists and from the templates themselves, so it can never drift from what the generator says.
"""
from __future__ import annotations

import functools
import re

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOR_RGB = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 170), "orange": (245, 130, 20),
}
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")        # the object's column in the picture
SIGN_SIDES = ("top", "bottom")                 # where the sign hangs
# 3-5 letters, similar lengths: at the 32 px low-res view only a blob is left, so a word
# cannot be guessed from its length alone; at 96 px it reads clearly.
SIGN_WORDS = (
    "bank", "bar", "books", "bread", "cafe", "cake", "exit", "farm", "fish", "fresh", "gate",
    "gym", "hotel", "jazz", "lamp", "milk", "music", "open", "park", "pizza", "post", "sale",
    "salon", "shoes", "shop", "soup", "stop", "sushi", "taxi", "tea", "toys", "wine",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")   # index = count
MAX_OBJECTS = 3

WORD_PATTERN = r"[a-z0-9]+|[^\sa-z0-9]"  # words/numbers and single punctuation marks
_WORD_RE = re.compile(WORD_PATTERN)


def tokenize_words(text: str) -> list[str]:
    """Lower-case word and punctuation tokens: how world text maps onto `corpus_words()`.

    World text is lower-case except LLaVA's fixed prompt sentences (e.g. "Answer the question
    using a single word or phrase.") and TextVQA human answers, which vary case on purpose.
    """
    return _WORD_RE.findall(text.lower())


def plural(word: str) -> str:
    """Human answer variant: 'book' <-> 'books'."""
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    if word.endswith(("x", "z", "sh", "ch")):
        return word + "es"
    return word + "s"


def typo(word: str) -> str:
    """Human answer variant: one fixed typo per word (fixed so the vocabulary stays closed)."""
    if len(word) >= 4:
        return word[0] + word[2] + word[1] + word[3:]
    return word + word[-1]


@functools.lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """Every word (lower-case, no punctuation) that any world text can contain, sorted."""
    from vlmlab.world import text  # templates live there; imported late to avoid a cycle

    words = set(SHAPES) | set(COLORS) | set(SIZES) | set(POSITIONS) | set(SIGN_SIDES)
    words |= set(SIGN_WORDS) | set(NUMBER_WORDS) | {str(i) for i in range(len(NUMBER_WORDS))}
    answerable = SIGN_WORDS + SHAPES + COLORS + SIZES + NUMBER_WORDS   # human answers vary these
    words |= {plural(w) for w in answerable} | {typo(w) for w in answerable}
    for sentence in text.template_sentences():
        words |= {t for t in tokenize_words(sentence) if t[0].isalnum()}
    return tuple(sorted(words))


def punctuation() -> tuple[str, ...]:
    """Punctuation tokens world text can contain (besides words)."""
    from vlmlab.world import text

    marks = set()
    for sentence in text.template_sentences():
        marks |= {t for t in tokenize_words(sentence) if not t[0].isalnum()}
    return tuple(sorted(marks))
