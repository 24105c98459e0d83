"""Everything said about a scene: web alt-text, dense captions, VQA, multiple choice, instructions.

Each function takes the scene and a numpy Generator (the caller owns seeding) and draws its
wording from the templates below. World text is lower-case words and simple punctuation;
`template_sentences()` lists every fixed sentence so `corpus_words()`, the world's word list, stays complete.
"""
from __future__ import annotations

import functools
import re

import numpy as np

from vlmlab.data.formats import CAPTION_PROMPTS
from vlmlab.evaluate.mmbench import PROMPT_SUFFIX as MMBENCH_SUFFIX
from vlmlab.evaluate.mmbench import build_prompt
from vlmlab.evaluate.textvqa import PROMPT_SUFFIX as TEXTVQA_SUFFIX
from vlmlab.models.processor import END_OF_TURN, START_OF_TURN
from vlmlab.sim.scene import Scene, Shape
from vlmlab.sim.vocab import (COLORS, NUMBER_WORDS, POSITIONS, SHAPES, SIGN_SIDES, SIGN_WORDS, SIZES, plural,
                              tokenize_words, typo)

DETAIL_PROMPTS = (   # stage-2 caption requests
    "describe the image in detail.",
    "what do you see in this picture?",
    "write a detailed caption for this image.",
)
SHORT_ANSWER = TEXTVQA_SUFFIX   # LLaVA's VQA suffix (the real benchmark's wording)
MC_SUFFIX = MMBENCH_SUFFIX      # LLaVA's MMBench suffix

OCR_QUESTIONS = (
    "what word is on the sign?",
    "what does the sign say?",
    "what is written on the sign?",
    "what word is written on the sign?",
    "what does the sign read?",
)
# caption openings and how the sign is mentioned
DENSE_OPENINGS = ("a picture of", "an image showing", "a simple scene with", "a photo of", "this image shows")
SIGN_PHRASES = (
    "a sign at the {side} reads {word}.",
    "a sign at the {side} says {word}.",
    "the sign at the {side} has the word {word} on it.",
    "the word {word} is written on a sign at the {side}.",
)
WEB_TEMPLATES = (
    "{word} sign",
    "{color} {shape} and {word} sign",
    "{size} {color} {shape}",
    "{word} sign with {shape}s",
    "{color} {shape} near the {word} sign",
    "the {word} sign",
    "{count} shapes and a sign",
    "{color} shapes",
)
OFF_TOPIC = (   # web alt-text that has nothing to do with the picture
    "click here for more",
    "best price free shipping",
    "stock photo",
    "image may contain text",
    "new arrivals this week",
    "view full size",
    "abstract background design",
    "untitled",
    "photo by our team",
    "download free vector art",
)
OTHER_QUESTIONS = {
    "color": "what color is the {shape} {where}?",
    "shape": "what shape is {where}?",
    "count": "how many shapes are there?",
    "size": "is the {shape} {where} small or large?",
}
MMBENCH_QUESTIONS = {
    "ocr": "which word is written on the sign?",
    "color": "what is the color of the {shape} {where}?",
    "shape": "which shape is {where}?",
    "count": "how many shapes are in the image, not counting the sign?",
    "position": "where is the sign?",
}
ARTICLES = ("the", "a")
WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
SIGN_POSITIONS_MC = ("top", "bottom", "left", "right")


def template_sentences() -> list[str]:
    """Every fixed sentence and template (placeholders dropped), for the vocabulary."""
    out = list(CAPTION_PROMPTS + DETAIL_PROMPTS + OCR_QUESTIONS + DENSE_OPENINGS + SIGN_PHRASES
               + WEB_TEMPLATES + OFF_TOPIC + tuple(OTHER_QUESTIONS.values()) + tuple(MMBENCH_QUESTIONS.values())
               + ARTICLES + SIGN_POSITIONS_MC + (SHORT_ANSWER, MC_SUFFIX))
    out += list(WHERE.values()) + ["a an and shapes , . : ? A B C D"]
    return [re.sub(r"\{\w+\}", " ", s) for s in out]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


def describe_object(obj: Shape) -> str:
    """'a large red circle on the left'"""
    phrase = f"{obj.size} {obj.color} {obj.shape}"
    return f"{_article(phrase)} {phrase} {WHERE[obj.position]}"


def dense_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Accurate, complete: every object with size, colour, shape, position, and the sign's word."""
    order = list(scene.objects) if rng.random() < 0.5 else sorted(scene.objects, key=lambda o: o.column)
    parts = [describe_object(o) for o in order]
    objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if rng.random() < 0.5:
        count = NUMBER_WORDS[scene.count]
        head = f"{_pick(rng, DENSE_OPENINGS)} {count} shape{'s' if scene.count > 1 else ''}: {objects}."
    else:
        head = f"{_pick(rng, DENSE_OPENINGS)} {objects}."
    return head + " " + _pick(rng, SIGN_PHRASES).format(side=scene.sign_side, word=scene.word)


def web_caption(scene: Scene, rng: np.random.Generator, noise_rate: float) -> str:
    """Short alt-text. With probability `noise_rate` it is off-topic or has a wrong attribute."""
    obj = scene.objects[int(rng.integers(scene.count))]
    fields = dict(word=scene.word, color=obj.color, shape=obj.shape, size=obj.size, count=NUMBER_WORDS[scene.count])
    if rng.random() < noise_rate:
        if rng.random() < 0.4:
            return _pick(rng, OFF_TOPIC)
        # one attribute is wrong, as alt-text written for another picture would be
        key = _pick(rng, ("word", "color", "shape"))
        pool = {"word": SIGN_WORDS, "color": COLORS, "shape": SHAPES}[key]
        fields[key] = _pick(rng, [v for v in pool if v != fields[key]])
        template = _pick(rng, [t for t in WEB_TEMPLATES if "{" + key + "}" in t])
        return template.format(**fields)
    return _pick(rng, WEB_TEMPLATES).format(**fields)


def _human_answers(answer: str, rng: np.random.Generator, wrong_pool) -> list[str]:
    """10 answers as annotators give them: a majority exact, some case/article/plural/typo variants."""
    variants = [answer.capitalize(), answer.upper(), f"{_pick(rng, ARTICLES)} {answer}", plural(answer),
                typo(answer), answer + " "]
    out = []
    for i in range(10):
        u = rng.random()
        if i < 5 or u < 0.45:       # at least 5 exact: the consensus TextVQA scoring rewards
            out.append(answer)
        elif u < 0.92:
            out.append(_pick(rng, variants))
        else:
            out.append(_pick(rng, [w for w in wrong_pool if w != answer]))
    return [out[i] for i in rng.permutation(10)]


def _question_about(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str, tuple]:
    """(kind, question, answer, wrong-answer pool) for one scene."""
    if rng.random() < 0.7:
        return "ocr", _pick(rng, OCR_QUESTIONS), scene.word, SIGN_WORDS
    obj = scene.objects[int(rng.integers(scene.count))]
    kind = _pick(rng, tuple(OTHER_QUESTIONS))
    q = OTHER_QUESTIONS[kind].format(shape=obj.shape, where=WHERE[obj.position])
    answer, pool = {"color": (obj.color, COLORS), "shape": (obj.shape, SHAPES),
                    "count": (NUMBER_WORDS[scene.count], NUMBER_WORDS[1:]), "size": (obj.size, SIZES)}[kind]
    return kind, q, answer, pool


def textvqa_item(scene: Scene, rng: np.random.Generator) -> dict:
    """{"question", "answer" (canonical), "answers" (10 human answers), "kind"}. Mostly reading the sign."""
    kind, q, answer, pool = _question_about(scene, rng)
    return {"question": q, "answer": answer, "answers": _human_answers(answer, rng, pool), "kind": kind}


def mmbench_item(scene: Scene, rng: np.random.Generator) -> dict:
    """{"question", "hint", "A".."D", "answer" (letter), "category"}: 4 options, one right."""
    category = _pick(rng, tuple(MMBENCH_QUESTIONS))
    obj = scene.objects[int(rng.integers(scene.count))]
    q = MMBENCH_QUESTIONS[category].format(shape=obj.shape, where=WHERE[obj.position])
    right, pool = {"ocr": (scene.word, SIGN_WORDS), "color": (obj.color, COLORS), "shape": (obj.shape, SHAPES),
                   "count": (str(scene.count), ("1", "2", "3", "4")),
                   "position": (scene.sign_side, SIGN_POSITIONS_MC)}[category]
    wrong = [v for v in pool if v != right]
    options = [right] + [wrong[i] for i in rng.permutation(len(wrong))[:3]]
    options = [options[i] for i in rng.permutation(4)]
    item = {"question": q, "hint": "", "category": category, "answer": "ABCD"[options.index(right)]}
    item.update(zip("ABCD", options))
    return item


def mmbench_prompt(item: dict) -> str:
    """LLaVA's MMBench prompt for one item (question, options, suffix)."""
    return build_prompt(item["question"], {k: item[k] for k in "ABCD"}, item["hint"])


def chat_round(question: str, answer: str) -> str:
    """One round of MGM's gemma template as the LM's own text (<bos>/<eos> are the tokenizer's to add)."""
    return f"{START_OF_TURN}user\n{question}{END_OF_TURN}\n{START_OF_TURN}model\n{answer}{END_OF_TURN}\n"


def described_scene_chats(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Text-only chat rounds whose question carries the scene as a dense caption: a short-answer
    question, then a caption or multiple-choice request (the image's place is taken by its description)."""
    context = dense_caption(scene, rng)
    _, q, answer, _ = _question_about(scene, rng)
    chats = [chat_round(f"{context}\n{q}\n{SHORT_ANSWER}", answer)]
    u = rng.random()
    if u < 0.5:
        chats.append(chat_round(f"{context}\n{_pick(rng, CAPTION_PROMPTS)}", web_caption(scene, rng, 0.0)))
    else:
        item = mmbench_item(scene, rng)
        chats.append(chat_round(f"{context}\n{mmbench_prompt(item)}", item["answer"]))
    return chats


def instruct_conversation(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """A LLaVA conversation (1-3 rounds): short-answer VQA, caption requests, multiple choice."""
    turns = []
    for r in range(int(rng.integers(1, 4))):
        u = rng.random()
        if u < 0.5:
            _, q, answer, _ = _question_about(scene, rng)
            human, gpt = f"{q}\n{SHORT_ANSWER}", answer
        elif u < 0.75:
            human, gpt = _pick(rng, DETAIL_PROMPTS), dense_caption(scene, rng)
        else:
            item = mmbench_item(scene, rng)
            human, gpt = mmbench_prompt(item), item["answer"]
        if r == 0:
            human = "<image>\n" + human
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return turns


@functools.lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """Every word (lower-case, no punctuation) that any world text can contain, sorted."""
    words = set(SHAPES) | set(COLORS) | set(SIZES) | set(POSITIONS) | set(SIGN_SIDES)
    words |= set(SIGN_WORDS) | set(NUMBER_WORDS) | {str(i) for i in range(len(NUMBER_WORDS))}
    answerable = SIGN_WORDS + SHAPES + COLORS + SIZES + NUMBER_WORDS   # human answers vary these
    words |= {plural(w) for w in answerable} | {typo(w) for w in answerable}
    for sentence in template_sentences():
        words |= {t for t in tokenize_words(sentence) if t[0].isalnum()}
    return tuple(sorted(words))


def punctuation() -> tuple[str, ...]:
    """Punctuation tokens world text can contain (besides words)."""
    marks = set()
    for sentence in template_sentences():
        marks |= {t for t in tokenize_words(sentence) if not t[0].isalnum()}
    return tuple(sorted(marks))


def world_words() -> list[str]:
    """Every word and punctuation mark world text can contain (what a world tokenizer must know)."""
    return list(corpus_words()) + list(punctuation())
