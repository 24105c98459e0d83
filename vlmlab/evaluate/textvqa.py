"""TextVQA accuracy exactly as the standard (EvalAI / mmf m4c) evaluator computes it.

Two pieces:
- `normalize_answer`: EvalAI's answer processor (lower case, punctuation, digits,
  number words, articles, contractions), including its historical quirks, because the
  published numbers (LLaVA, MGM, lmms-eval) are computed with them.
- `soft_score`: per question, the mean over the leave-one-out subsets of the human
  answers of min(1, matches / 3).

Written here rather than imported: the reference lives inside mmf / LLaVA, which are not
installable libraries; this is a re-implementation checked against their per-question
scores (tests/test_textvqa.py, ../shared/fixtures/textvqa).
"""
from __future__ import annotations

import re

# LLaVA/MGM ask TextVQA with this instruction after the question (llava_textvqa_val_v051_ocr.jsonl)
PROMPT_SUFFIX = "Answer the question using a single word or phrase."

# EvalAI's contraction table: a word written without its apostrophe gets it back
# ("dont" -> "don't"). Entries as in mmf (incl. its odd ones, e.g. somebody'd -> somebodyd,
# and capitalised keys that can never match after lower-casing): scores depend on them.
_CONTRACTIONS = (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't "
    "couldn'tve:couldn't've couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't "
    "hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd "
    "hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've "
    "I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll "
    "let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've "
    "mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock "
    "oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
    "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
    "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd "
    "somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll "
    "somebodys:somebody's someoned:someone'd someoned've:someone'd've "
    "someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd "
    "somethingd've:something'd've something'dve:something'd've somethingll:something'll "
    "thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're "
    "theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll "
    "theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've "
    "weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've "
    "whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've "
    "who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're "
    "whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've "
    "wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've "
    "y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've "
    "youll:you'll youre:you're youve:you've"
)
CONTRACTIONS = dict(pair.split(":") for pair in _CONTRACTIONS.split())
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# EvalAI's pattern is literally "(?!<=\d)(\.)(?!\d)": the first group is a (mistyped)
# negative lookahead, so in effect every "." not followed by a digit goes ("3.5" stays, "5." loses it).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d)(\,)+(?=\d)")
# EvalAI passes re.UNICODE (== 32) where `count` goes: at most 32 periods are stripped.
_PERIOD_COUNT = int(re.UNICODE)


def _strip_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # A mark touching a space (or any digit,digit comma) is deleted; inside a word it splits it.
        if p + " " in text or " " + p in text or _DIGIT_COMMA_DIGIT.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def normalize_answer(answer: str) -> str:
    """EvalAI answer processing: `"The  Two DOGS!"` -> `"2 dogs"`, `"dont"` -> `"don't"`."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def answer_scores(answers: list[str]) -> dict[str, float]:
    """Soft score of every distinct normalised human answer.

    For each of the n leave-one-out subsets (n = 10 in TextVQA), min(1, matches/3) among
    the n-1 others; the score is their mean, summed in the evaluator's order so the float
    agrees to the last digit.
    """
    if not answers:
        raise ValueError("a TextVQA question needs at least one human answer")
    norm = [normalize_answer(a) for a in answers]
    scores = {}
    for candidate in set(norm):
        accs = []
        for left_out in range(len(norm)):
            matches = sum(1 for i, a in enumerate(norm) if i != left_out and a == candidate)
            accs.append(min(1, float(matches) / 3))
        scores[candidate] = sum(accs) / len(accs)
    return scores


def soft_score(prediction: str, answers: list[str]) -> float:
    """VQA soft accuracy of one prediction against its human answers, in [0, 1]."""
    return answer_scores(answers).get(normalize_answer(prediction), 0.0)


def question_from_prompt(prompt: str) -> str:
    """The question inside a LLaVA-style TextVQA prompt, lower-cased (LLaVA's join key).

    Layouts: "<q>\\nReference OCR token: ...\\n<instruction>", "<q>\\n<instruction>",
    "OCR tokens: ... Question: <q> Short answer:"; a bare question is returned as is.
    """
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if m:
            return m.group(1).lower()
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3 and prompt.startswith("Reference OCR token:"):
        return lines[1].lower()
    return lines[0].lower()


def match_annotations(predictions: list[dict], annotations: list[dict]) -> list[dict]:
    """The annotation row of each prediction, joined as LLaVA's eval_textvqa does.

    predictions: LLaVA answer rows {"question_id": image id, "prompt", "text"};
    annotations: TextVQA rows {"image_id", "question", "answers"}. The key is
    (image id, lower-cased question): LLaVA's question_id is the image id and repeats.
    """
    by_key = {(str(a["image_id"]), a["question"].lower()): a for a in annotations}
    matched = []
    for n, p in enumerate(predictions, 1):
        key = (str(p["question_id"]), question_from_prompt(p["prompt"]))
        if key not in by_key:
            raise KeyError(f"prediction {n} (question_id {key[0]!r}, question {key[1]!r}) has no annotation")
        matched.append(by_key[key])
    return matched


def score_predictions(predictions: list[dict], annotations: list[dict]) -> list[float]:
    """Per-prediction soft scores (see match_annotations for the join)."""
    return [soft_score(p["text"], a["answers"]) for p, a in zip(predictions, match_annotations(predictions, annotations))]
