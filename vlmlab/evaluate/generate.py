"""Batched greedy decoding for evaluation: the same answers as one-at-a-time decoding, faster.

How (each step is what makes a batch safe or fast):
- prompts are encoded once up front (images pre-processed), sorted by length and cut into
  batches, so a batch pads little; answers go back in input order;
- left padding, with position ids counted over real tokens only, so a padded prompt sees
  exactly the positions it would see alone;
- image features are computed in chunks (`vision_batch`: MGM's high-res map is large) and
  spliced into the prompt embeddings; one prefill fills a KV cache and keeps only the last
  logits (a 256k vocabulary over a whole prompt batch would not fit);
- each decoding step runs the language model on one token per row against the cache;
  finished rows (stop token seen) are fed pad tokens and masked out of the answer; the
  loop ends when every row has stopped or `max_new_tokens` is reached;
- `cache="static"` preallocates the KV cache once per batch size and keeps every decoding
  step the same shape, so `compile=True` can capture it with CUDA graphs
  (torch.compile mode "reduce-overhead"); `cache="dynamic"` (default) grows it.

Written as our own loop rather than `model.generate` because generate runs the whole MGM
forward (image-token bookkeeping with a host sync) at every step and cannot compile it;
tests/test_generate.py checks the answers equal `model.generate` one prompt at a time.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from transformers import DynamicCache, StaticCache

TEXTVQA_SUFFIX = "Answer the question using a single word or phrase."   # as MGM/LLaVA's TextVQA eval
CAPTION_PROMPT = "Describe the image briefly."


def unwrap(model) -> torch.nn.Module:
    """The MGM module under a peft wrapper (its LoRA layers stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encode_items(processor, items: Iterable[dict]) -> list[dict]:
    """[{"prompt": str, "image": PIL image or path}] -> processor.encode_prompt outputs (images pre-processed)."""
    return [processor.encode_prompt(it["prompt"], it.get("image")) for it in items]


class GreedyDecoder:
    """Greedy decoding of left-padded prompt batches with a KV cache (see the module docstring)."""

    def __init__(self, model, stop_ids: list[int], pad_id: int, max_new_tokens: int, cache: str = "dynamic",
                 compile: bool = False, vision_batch: int | None = None):
        if cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', not {cache!r}")
        if compile and cache != "static":
            raise ValueError("compile=True needs cache='static' (fixed shapes for CUDA graphs)")
        self.mgm = unwrap(model)
        self.lm = self.mgm.language_model
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        self.pad_id = int(pad_id)
        self.max_new_tokens = int(max_new_tokens)
        self.cache_kind = cache
        self.vision_batch = vision_batch
        self._static: dict[tuple[int, int], StaticCache] = {}
        self._step: Callable = self._decode_step
        if compile:
            self._step = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=False, dynamic=False)

    @property
    def device(self) -> torch.device:
        return self.mgm.get_input_embeddings().weight.device

    def _decode_step(self, tokens, position_ids, attention_mask, cache) -> torch.Tensor:
        # tokens (B, 1), position_ids (B, 1), attention_mask (B, L) -> next token ids (B,)
        # a generated <image> id is embedded as MGM's forward does it: as id 0, never as a feature slot
        tokens = tokens.masked_fill(tokens == self.mgm.config.image_token_id, 0)
        logits = self.lm(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True).logits
        return logits[:, -1].argmax(-1)

    def _cache(self, batch: int, length: int):
        if self.cache_kind == "dynamic":
            return DynamicCache(config=self.lm.config)
        # one static cache per (batch, length bucket), reset between batches: shapes never change
        key = (batch, length)
        if key not in self._static:
            self._static[key] = StaticCache(config=self.lm.config, max_cache_len=length)
        cache = self._static[key]
        cache.reset()
        return cache

    def _prompt_embeds(self, input_ids, pixel_values, pixel_values_aux) -> torch.Tensor:
        """(B, T) ids + images -> (B, T, D) embeddings with image features in the placeholder slots."""
        mgm = self.mgm
        image_mask = input_ids == mgm.config.image_token_id                          # (B, T)
        embeds = mgm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))     # (B, T, D)
        if pixel_values is None:
            return embeds
        step = self.vision_batch or len(pixel_values)
        feats = torch.cat([
            mgm.get_image_features(pixel_values[i:i + step],
                                   None if pixel_values_aux is None else pixel_values_aux[i:i + step])
            for i in range(0, len(pixel_values), step)])                              # (B, N, D)
        if int(image_mask.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"{int(image_mask.sum())} image tokens for {feats.shape[0]} x {feats.shape[1]} image features")
        return embeds.masked_scatter(image_mask[..., None], feats.to(embeds.dtype))

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask, pixel_values=None, pixel_values_aux=None,
                 cache_len: int | None = None) -> list[list[int]]:
        """Left-padded batch (B, T) -> generated ids per row, stop token excluded."""
        dev = self.device
        dtype = self.mgm.get_input_embeddings().weight.dtype
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        if pixel_values is not None:
            pixel_values = pixel_values.to(dev, dtype)
        if pixel_values_aux is not None:
            pixel_values_aux = pixel_values_aux.to(dev, dtype)
        B, T = input_ids.shape
        L = max(cache_len or 0, T + self.max_new_tokens)
        # the mask covers every position the cache will hold: left pads 0, prompt and future tokens 1
        mask = torch.ones(B, L, dtype=torch.long, device=dev)
        mask[:, :T] = attention_mask
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)                      # (B, T)
        cache = self._cache(B, L)
        embeds = self._prompt_embeds(input_ids, pixel_values, pixel_values_aux)      # (B, T, D)
        static = self.cache_kind == "static"
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask if static else mask[:, :T],
                         position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1)                                            # (B,)
        stop_ids = self.stop_ids.to(dev)
        done = torch.isin(token, stop_ids)
        out = [token]
        position = positions[:, -1:]                                                # (B, 1)
        for step in range(1, self.max_new_tokens):
            if bool(done.all()):
                break
            position = position + 1
            step_mask = mask if static else mask[:, :T + step]
            token = self._step(token[:, None], position, step_mask, cache)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            out.append(token.clone())  # clone: a CUDA-graph output is overwritten by the next replay
            done = done | torch.isin(token, stop_ids)
        generated = torch.stack(out, dim=1).tolist()                                # (B, steps)
        stops = set(self.stop_ids.tolist())
        answers = []
        for row in generated:
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            answers.append(row[:cut])
        return answers


def generate_answers(model, processor, items: list[dict], batch_size: int = 16, max_new_tokens: int = 16,
                     cache: str = "dynamic", compile: bool = False, vision_batch: int | None = None,
                     stop_token_ids: list[int] | None = None, decoder: GreedyDecoder | None = None,
                     cache_len: int | None = None, progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers for items [{"prompt": question text, "image": PIL image | path}] or
    already encoded items (with "input_ids"), in input order.

    Prompts are sorted by length into batches of `batch_size` (left padded); decoding
    stops at the processor's stop tokens (or `stop_token_ids`; [] never stops early) or
    after `max_new_tokens`. Pass a `decoder` (and a fixed `cache_len`) to reuse one compiled
    decode step and its static caches across calls.
    """
    if not items:
        return []
    encoded = [it if "input_ids" in it else processor.encode_prompt(it["prompt"], it.get("image")) for it in items]
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    if decoder is None:
        stops = processor.stop_token_ids if stop_token_ids is None else stop_token_ids
        decoder = GreedyDecoder(model, stops, pad_id, max_new_tokens, cache=cache,
                                compile=compile, vision_batch=vision_batch)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    # one static cache length for every batch: a compiled decode step never sees a new shape
    if cache_len is None and decoder.cache_kind == "static":
        cache_len = max(len(e["input_ids"]) for e in encoded) + decoder.max_new_tokens
    answers: list[str | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = processor.pad([{k: v for k, v in encoded[i].items() if k != "labels"} for i in idx], padding_side="left")
        ids = decoder(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                      batch.get("pixel_values_aux"), cache_len=cache_len)
        for i, text in zip(idx, processor.batch_decode(ids)):
            answers[i] = text
        if progress:
            progress(len(idx))
    return answers  # type: ignore[return-value]
