"""The tiny world's tokenizer: word level, trained with the `tokenizers` library on world text.

A closed world has a closed vocabulary, so whole words are the natural unit: one token per
word keeps sequences short (fast on a CPU) and nothing is ever out of vocabulary when the
world's own word list (`vocab.corpus_words()`) is added to what the trainer saw.

It behaves like gemma-2b-it's tokenizer where MGM depends on it: special tokens at Gemma's ids
(<pad> 0, <eos> 1, <bos> 2, <unk> 3), <start_of_turn>/<end_of_turn> special, a newline
token (the gemma template's "\\n" are tokens), <bos> added by default, and no <image> (the
processor appends it after the vocabulary, as it does to Gemma's).
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vlmlab.models.processor import END_OF_TURN, ROLES, START_OF_TURN
from vlmlab.sim.vocab import WORD_PATTERN  # the world's own word split (vocab.tokenize_words)

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN]
TEMPLATE_WORDS = sorted(set(ROLES.values())) + ["\n"]  # the chat template's own words ("model", "user", newline)


def train_world_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `texts`; `extra_words` (the world's full word list) are always in."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    # the world's own word split (vocab.tokenize_words): lower-case words/numbers and single
    # punctuation marks are tokens; so is a newline (Gemma's "\\n"); other whitespace vanishes
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|" + WORD_PATTERN), behavior="removed", invert=True)
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False)
    extra = sorted({w for w in list(extra_words) + TEMPLATE_WORDS if w})
    tok.train_from_iterator(list(texts) + [" ".join(extra)], trainer=trainer)
    # Gemma's tokenizer puts <bos> first (MGM's tokenizer_image_token relies on it)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a `tokenizers` one (save_pretrained/from_pretrained, decode)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN],
        clean_up_tokenization_spaces=True,  # "a cat ." -> "a cat."
        model_max_length=1024)
