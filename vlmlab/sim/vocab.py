"""Closed vocabularies of the tiny world: everything a scene can hold, and how world text splits into words.

The text templates live in `text.py`, which also derives the world's full word list from these
lists and the templates (`text.corpus_words()`).
"""
from __future__ import annotations

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
