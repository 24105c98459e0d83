"""Batched greedy decoding for evaluation: the same answers as one-at-a-time decoding (exactly
in float32; in bf16 on a GPU the order of a kernel's sums can flip near-tied argmaxes), faster.

How (each step is what makes a batch safe or fast):
- a prompt splits after its image: the prefix (template and image tokens, ~90% of a
  TextVQA prompt) and the suffix (question, OCR tokens, answer cue). Questions about one
  image share their prefix: its image features and its KV cache are computed once per
  batch and copied into each question's cache row (TextVQA asks ~1.6 questions per image);
- prompts are grouped by prefix, groups ordered by suffix length and cut into batches,
  so a batch pads little; answers go back in input order. Images are read per prefix
  chunk (a whole benchmark's pixels do not fit in memory);
- a cache row is [pads | prefix | pads | suffix | answer]; position ids count real tokens
  only, so every row sees exactly the positions it would see alone;
- distinct prefixes are prefilled in chunks of `prefix_batch`, in the order batches first
  need them, and kept until the last batch that uses them: vision towers and the prefix
  prefill always see the same shapes (one cuDNN plan, one compiled graph), however the
  questions fall into batches. The prefix prefill keeps no logits, and with equal-length
  prefixes (the usual case) needs no mask, so attention takes the causal flash kernel;
- the suffix prefill keeps only the last logits (a 256k vocabulary over a whole batch
  would not fit); each decoding step runs the language model on one token per row against
  the cache; finished rows (stop token seen) are fed pad tokens and masked out of the
  answer; the loop ends when every row has stopped or `max_new_tokens` is reached;
- `cache="static"` preallocates the KV cache once per batch size and keeps every decoding
  step the same shape, so `compile=True` can capture it with CUDA graphs
  (torch.compile mode "reduce-overhead"); `cache="dynamic"` (default) grows it.
  `compile=True` also compiles the image features and the prefix prefill, and pads the
  last prefix chunk to `prefix_batch` rows so that they never meet a new shape;
  `compile="decode"` compiles the decode step only.

Written as our own loop rather than `model.generate` because generate runs the whole MGM
forward (image-token bookkeeping with a host sync) at every step, cannot share a prefix
between prompts and cannot compile it; tests/test_generate.py checks the answers equal
`model.generate` one prompt at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from vlmlab.batching import pad

def unwrap(model) -> torch.nn.Module:
    """The MGM module under a peft wrapper (its LoRA layers stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def split_at_image(ids: torch.Tensor, image_token_id: int) -> int:
    """Length of a prompt's prefix: through its last image token (a prompt without one: all
    but its last token), leaving at least one suffix token to take the next-token logits from."""
    where = (ids == image_token_id).nonzero()
    return min(int(where[-1]) + 1, len(ids) - 1) if len(where) else len(ids) - 1


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id tensors -> (ids, mask), both (len(rows), longest), padded on the left."""
    return pad(rows, pad_id, "left")


@dataclass
class Prefixes:
    """Prefilled prompt prefixes: per layer (keys, values), each (m, kv_heads, P, head_dim);
    mask (m, P), 0 on left padding."""
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor

    @staticmethod
    def gather(refs: list[tuple["Prefixes", int]]) -> "Prefixes":
        """Row r of the result is row refs[r][1] of chunk refs[r][0]; chunks left-padded to the longest."""
        chunks = list({id(c): c for c, _ in refs}.values())
        start, n = {}, 0
        for c in chunks:
            start[id(c)], n = n, n + len(c.mask)
        P = max(c.mask.shape[1] for c in chunks)
        rows = torch.tensor([start[id(c)] + r for c, r in refs], device=chunks[0].mask.device)

        def take(parts: list[torch.Tensor], dim: int) -> torch.Tensor:  # left-pad `dim` to P, concatenate, pick rows
            parts = [t if t.shape[dim] == P else F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (P - t.shape[dim], 0))
                     for t in parts]
            return (parts[0] if len(parts) == 1 else torch.cat(parts)).index_select(0, rows)

        kv = [(take([c.kv[layer][0] for c in chunks], 2), take([c.kv[layer][1] for c in chunks], 2))
              for layer in range(len(chunks[0].kv))]
        return Prefixes(kv, take([c.mask for c in chunks], 1))


class GreedyDecoder:
    """Greedy decoding of prompt batches with a shared-prefix KV cache (see the module docstring)."""

    def __init__(self, model, stop_ids: list[int], pad_id: int, max_new_tokens: int, cache: str = "dynamic",
                 compile: bool | str = False, prefix_batch: int | None = None):
        if cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', not {cache!r}")
        if compile not in (False, True, "decode"):
            raise ValueError(f"compile must be False, True or 'decode', not {compile!r}")
        if compile and (cache != "static" or not prefix_batch):
            raise ValueError("compile needs cache='static' and a prefix_batch (fixed shapes for compiled graphs)")
        self.mgm = unwrap(model)
        self.lm = self.mgm.language_model
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        self.pad_id = int(pad_id)
        self.max_new_tokens = int(max_new_tokens)
        self.cache_kind = cache
        self.prefix_batch = prefix_batch
        self.pad_prefixes = compile is True  # fill the last prefix chunk up to prefix_batch rows
        self._static: dict[tuple[int, int], StaticCache] = {}
        self._step: Callable = self._decode_step
        self._features: Callable = self.mgm.get_image_features
        self._prefix_lm: Callable = self.lm.base_model
        if compile:
            self._step = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=False, dynamic=False)
        if compile is True:
            self._features = torch.compile(self._features, dynamic=False)
            self._prefix_lm = torch.compile(self._prefix_lm, dynamic=False)

    @property
    def device(self) -> torch.device:
        return self.mgm.get_input_embeddings().weight.device

    def _decode_step(self, tokens, position_ids, attention_mask, cache) -> torch.Tensor:
        # tokens (B, 1), position_ids (B, 1), attention_mask (B, L) -> next token ids (B,)
        logits = self.lm(inputs_embeds=self.mgm.embed_inputs(tokens), attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True).logits
        return logits[:, -1].argmax(-1)

    def _cache(self, batch: int, length: int):
        if self.cache_kind == "dynamic":
            return DynamicCache(config=self.lm.config)
        # one static cache per (batch, length), reset between batches: shapes never change
        key = (batch, length)
        if key not in self._static:
            self._static[key] = StaticCache(config=self.lm.config, max_cache_len=length)
        cache = self._static[key]
        cache.reset()
        return cache

    def _embed(self, input_ids, pixel_values=None, pixel_values_aux=None) -> torch.Tensor:
        """(B, T) ids + images -> (B, T, D) embeddings with image features in the placeholder slots."""
        feats = None if pixel_values is None else self._features(pixel_values, pixel_values_aux)
        return self.mgm.embed_inputs(input_ids, feats)

    @torch.inference_mode()
    def prefill(self, prefixes: list[torch.Tensor], pixel_values=None, pixel_values_aux=None) -> Prefixes:
        """Distinct prompt prefixes (ids) -> their keys/values; `pixel_values` holds one image per
        prefix with image tokens, in prefix order."""
        dev = self.device
        dtype = self.mgm.get_input_embeddings().weight.dtype
        ids, mask = (t.to(dev) for t in left_pad(prefixes, self.pad_id))          # (m, P)
        m = len(ids)
        pixels = [None if t is None else t.to(dev, dtype) for t in (pixel_values, pixel_values_aux)]
        if self.pad_prefixes and m < self.prefix_batch:  # one shape for the compiled graphs: repeat the last prefix
            extra = self.prefix_batch - m
            has_image = bool((ids[-1] == self.mgm.config.image_token_id).any())
            ids, mask = (torch.cat([t, t[-1:].expand(extra, -1)]) for t in (ids, mask))
            pixels = [t if t is None or not has_image else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])
                      for t in pixels]
        embeds = self._embed(ids, *pixels)
        equal = bool(mask.all())  # no padding: no mask, so SDPA may take its causal flash kernel
        cache = DynamicCache(config=self.lm.config)
        self._prefix_lm(inputs_embeds=embeds, attention_mask=None if equal else mask,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0), past_key_values=cache, use_cache=True)
        return Prefixes([(layer.keys[:m], layer.values[:m]) for layer in cache.layers], mask[:m])

    @torch.inference_mode()
    def decode(self, prefix: Prefixes, suffixes: list[torch.Tensor], cache_len: int | None = None) -> list[list[int]]:
        """Row r is prompt prefix row r + suffixes[r] -> generated ids per row, stop token excluded."""
        dev = self.device
        if min(len(s) for s in suffixes) == 0:
            raise ValueError("every prompt needs at least one token after its shared prefix")
        suf_ids, suf_mask = (t.to(dev) for t in left_pad(suffixes, self.pad_id))    # (B, S)
        (B, S), P = suf_ids.shape, prefix.mask.shape[1]
        L = max(cache_len or 0, P + S + self.max_new_tokens)
        # the mask covers every position the cache will hold: pads 0, prompt and future tokens 1
        mask = torch.ones(B, L, dtype=torch.long, device=dev)
        mask[:, :P] = prefix.mask
        mask[:, P:P + S] = suf_mask
        positions = (mask[:, :P + S].cumsum(-1) - 1).clamp(min=0)                    # (B, P + S)
        cache = self._cache(B, L)
        for layer, (keys, values) in enumerate(prefix.kv):
            cache.update(keys, values, layer)
        static = self.cache_kind == "static"
        logits = self.lm(inputs_embeds=self._embed(suf_ids), attention_mask=mask if static else mask[:, :P + S],
                         position_ids=positions[:, P:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1)                                            # (B,)
        stop_ids = self.stop_ids.to(dev)
        done = torch.isin(token, stop_ids)
        out = [token]
        position = positions[:, -1:]                                                # (B, 1)
        for step in range(1, self.max_new_tokens):
            if bool(done.all()):
                break
            position = position + 1
            step_mask = mask if static else mask[:, :P + S + step]
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


def _image_key(item: dict):
    """What identifies an item's image: its path, or the object (PIL image, pixel tensor)."""
    if "input_ids" in item:
        return id(item["pixel_values"]) if "pixel_values" in item else None
    image = item.get("image")
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else (None if image is None else id(image))


def _views(processor, item: dict) -> dict:
    return item if "input_ids" in item else processor.images(item["image"])


def static_cache_len(prompts: list[torch.Tensor], image_token_id: int, max_new_tokens: int) -> int:
    """The one static cache length that fits every batch of these prompts."""
    cuts = [split_at_image(p, image_token_id) for p in prompts]
    return max(cuts) + max(len(p) - c for p, c in zip(prompts, cuts)) + max_new_tokens


def generate_answers(model, processor, items: list[dict], batch_size: int = 16, max_new_tokens: int = 16,
                     cache: str = "dynamic", compile: bool | str = False, prefix_batch: int | None = None,
                     decoder: GreedyDecoder | None = None, cache_len: int | None = None) -> list[str]:
    """Greedy answers for items [{"prompt": question text, "image": PIL image | path}] or
    already encoded items (with "input_ids"), in input order.

    Prompts are grouped by image (one prefix prefill per image, in chunks of `prefix_batch`,
    default `batch_size`), ordered by length into batches of `batch_size`; decoding stops at
    the processor's stop tokens or after `max_new_tokens`. Pass a `decoder` (and a fixed
    `cache_len`) to reuse one compiled decoder and its static caches across calls.
    """
    if not items:
        return []
    if decoder is None:
        pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
        decoder = GreedyDecoder(model, processor.stop_token_ids, pad_id, max_new_tokens, cache=cache,
                                compile=compile, prefix_batch=prefix_batch or batch_size)
    image_id = decoder.mgm.config.image_token_id
    prompts = [it["input_ids"] if "input_ids" in it else processor.prompt_ids(it["prompt"], it.get("image") is not None)
               for it in items]
    cuts = [split_at_image(p, image_id) for p in prompts]
    suffix_len = [len(p) - c for p, c in zip(prompts, cuts)]
    group_ids: dict[tuple, int] = {}  # (image, prefix ids) -> group number
    group_of = [group_ids.setdefault((_image_key(it), tuple(p[:c].tolist())), len(group_ids))
                for it, p, c in zip(items, prompts, cuts)]
    groups: list[list[int]] = [[] for _ in group_ids]
    for i, g in enumerate(group_of):
        groups[g].append(i)
    for members in groups:
        members.sort(key=lambda i: (suffix_len[i], i))
    groups.sort(key=lambda g: (suffix_len[g[0]], g[0]))
    order = [i for g in groups for i in g]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    # one static cache length for every batch: a compiled decode step never sees a new shape
    if cache_len is None and decoder.cache_kind == "static":
        cache_len = max(cuts) + max(suffix_len) + decoder.max_new_tokens

    pending = [group_of[g[0]] for g in groups][::-1]  # prefixes in the order batches first need them
    first_row = {group_of[g[0]]: g[0] for g in groups}
    last_batch = {group_of[i]: b for b, idx in enumerate(batches) for i in idx}
    chunk = decoder.prefix_batch or batch_size
    ready: dict[int, tuple[Prefixes, int]] = {}
    answers: list[str | None] = [None] * len(items)
    for b, idx in enumerate(batches):
        while any(group_of[i] not in ready for i in idx):
            keys = [pending.pop() for _ in range(min(chunk, len(pending)))]
            rows = [first_row[k] for k in keys]
            views = [_views(processor, items[i]) for i in rows if image_id in prompts[i][:cuts[i]]]
            pixels = [torch.stack([v[k] for v in views]) if views and k in views[0] else None
                      for k in ("pixel_values", "pixel_values_aux")]
            done = decoder.prefill([prompts[i][:cuts[i]] for i in rows], *pixels)
            ready.update({k: (done, r) for r, k in enumerate(keys)})
        ids = decoder.decode(Prefixes.gather([ready[group_of[i]] for i in idx]),
                             [prompts[i][cuts[i]:] for i in idx], cache_len=cache_len)
        for g in {group_of[i] for i in idx if last_batch[group_of[i]] == b}:
            del ready[g]  # frees a prefix chunk once none of its rows is needed
        for i, text in zip(idx, processor.batch_decode(ids)):
            answers[i] = text
    return answers  # type: ignore[return-value]
