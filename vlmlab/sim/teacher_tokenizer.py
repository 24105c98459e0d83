"""A word-level tokenizer over the world's words, laid out like OPT's so a tiny BLIP-2 fits Data-Juicer.

Data-Juicer's image_captioning_mapper sets `model.config.image_token_index = 50265` on every call,
which is where `Blip2Processor` puts `<image>` for blip2-opt-2.7b. So the text vocabulary keeps OPT's
layout: `<s>`=0, `<pad>`=1, `</s>`=2 (OPT's BOS *and* EOS), `<unk>`=3, then the world's words, then
filler tokens up to id 50264; `Blip2Processor` appends `<image>` as id 50265 itself (we must not set it),
and the LM's embedding matrix is padded to OPT's 50272 rows.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlmlab.sim.vocab import tokenize_words

OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3 as in facebook/opt-*
IMAGE_TOKEN_ID = 50265  # Data-Juicer hard-codes it; Blip2Processor adds "<image>" at len(vocab)
LM_VOCAB_SIZE = 50272  # OPT's embedding rows (50265 tokens + <image> + 6 unused)


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: `words` (lower-case world words and punctuation) get ids 4.., fillers pad to 50265."""
    vocab = {tok: i for i, tok in enumerate(OPT_SPECIALS)}
    for w in sorted(set(words) - set(vocab)):
        vocab[w] = len(vocab)
    if len(vocab) > IMAGE_TOKEN_ID:
        raise ValueError(f"{len(vocab)} words do not fit below OPT's <image> id {IMAGE_TOKEN_ID}")
    while len(vocab) < IMAGE_TOKEN_ID:  # fillers keep <image> at 50265; they are never targets
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # words and single punctuation marks, as vocab.tokenize_words splits world text
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    # WordPiece joins words with spaces and its cleanup glues " ." " ," " ?" " '" back on; ":" it leaves.
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace(" :", ":")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",  # OPT starts every sequence with </s>
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
        model_max_length=512,
    )


def caption_words(captions: list[str]) -> list[str]:
    """The word-level vocabulary of some captions (what `build_tokenizer` needs), split like the tokenizer."""
    return sorted({w for c in captions for w in tokenize_words(c)})


def first_filler_id(tokenizer) -> int:
    """Id of the first filler token (= 4 + number of words); the vocabulary is contiguous below it."""
    vocab = tokenizer.get_vocab()
    fillers = [i for t, i in vocab.items() if t.startswith("<filler_")]
    return min(fillers) if fillers else IMAGE_TOKEN_ID
