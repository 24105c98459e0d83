"""Fast sampled captioning for BLIP-2-style captioners: every candidate of a sub-batch in one decode.

Data-Juicer's image_captioning_mapper calls `model.generate(max_new_tokens=128, do_sample=True)` once per
candidate (caption_num times per sub-batch): the vision towers run caption_num times, the dynamic KV cache
is re-concatenated at every step and each step is ~40 kernel launches per layer from Python. Here:
- the image features are computed once per image and repeated for its caption_num rows, so one decode
  samples all candidates (rows [i*n, (i+1)*n) belong to image i);
- the KV cache is a transformers `StaticCache` of fixed length (prompt + max_new_tokens): nothing is
  concatenated or copied as captions grow. Attention reads only the filled part of it: when no prompt is
  padded (the usual case: one prompt, or none) every row has the same length, so the step attends to a
  view of the first `length` cache slots with no mask, which SDPA runs with its flash kernel (measured on
  an H200: a masked attention over the whole static cache made a 768-row step of OPT-2.7b ~44 ms, as
  slow with CUDA graphs as without). `compile=True` instead keeps every step the same shape (masked
  attention over the whole cache) and compiles it with torch.compile mode "reduce-overhead" (CUDA graphs);
- the loop stops as soon as every row has emitted EOS (at most max_new_tokens steps);
- the LM head keeps only the rows generation_config.suppress_tokens allows (the tiny teacher suppresses
  all but its few hundred world words): the same distribution as transformers' SuppressTokens processor,
  which sets those logits to -inf.
Sampling follows transformers' generate for do_sample=True: the generation config is resolved the way
generate resolves it (model's generation_config, then transformers' global defaults, e.g. top_k=50), then
suppress -> temperature -> top-k -> top-p -> softmax -> torch.multinomial on the global torch generator,
so `torch.manual_seed` fixes the captions. Options generate would apply and this loop does not
(repetition penalty, beams, min length, ...) are refused with a clear error rather than ignored.
The output is what the stock op decodes: prompt ids + new ids (finished rows padded with pad_token_id),
`batch_decode(skip_special_tokens=True)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, StaticCache

from vlmlab.synth.teacher_generate import _warp

SLICED = "vlmlab_sliced_sdpa"
_FILLED = {"length": 0}  # cache slots holding keys/values in the decode under way (one decode at a time per process)


def sliced_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA over the first `_FILLED["length"]` slots of a static cache, rows of equal length (no mask):
    causal for the prefill (query as long as the filled part), unmasked for a one-token decoding step.
    query (B, H, q, d), key/value (B, H, L, d) -> (B, q, H, d) as transformers' attention functions return."""
    n = _FILLED["length"]
    out = F.scaled_dot_product_attention(query, key[:, :, :n], value[:, :, :n], is_causal=query.shape[2] > 1,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SLICED, sliced_sdpa)  # not a mask function: transformers then passes no mask

# generation options the loop implements; any other option that changes sampling is refused
UNSUPPORTED = {  # name: value at which it is inactive
    "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0, "min_new_tokens": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "begin_suppress_tokens": None,
    "exponential_decay_length_penalty": None, "sequence_bias": None, "watermarking_config": None,
    "renormalize_logits": False, "remove_invalid_values": False, "stop_strings": None,
}


def resolve_generation_config(model, max_new_tokens: int):
    """The config transformers' generate would sample with for `generate(max_new_tokens=..., do_sample=True)`."""
    gc, _ = model._prepare_generation_config(None, max_new_tokens=max_new_tokens, do_sample=True)
    active = {k: getattr(gc, k, v) for k, v in UNSUPPORTED.items() if getattr(gc, k, v) not in (v, None, False)
              and not (k in ("min_length", "min_new_tokens") and getattr(gc, k) == 0)}
    if active:
        raise ValueError(f"fast captioner: generation_config sets {active}, which this sampler does not implement; "
                         f"use the stock image_captioning_mapper (synth.captioner_op: stock)")
    if gc.eos_token_id is None:
        raise ValueError("fast captioner: generation_config has no eos_token_id")
    return gc


class FastCaptioner:
    """caption_num sampled captions per image from a `Blip2ForConditionalGeneration`-like model (decoder-only LM).

    :param compile: torch.compile the decoding step with CUDA graphs (masked attention over the whole static
        cache); "auto" and False: eager steps attending to the filled slots only
    :param bf16: on CUDA, run the model in bfloat16 (casts it once, in place)
    :param pad_rows: on a compiled step, pad every sub-batch to this many images so the graphs see one shape
    """

    def __init__(self, model, processor, caption_num: int = 1, max_new_tokens: int = 128, compile: bool | str = "auto",
                 bf16: bool = True, pad_rows: int | None = None):
        self.model, self.processor = model.eval(), processor
        self.lm = model.language_model
        if getattr(self.lm.config, "is_encoder_decoder", False):
            raise ValueError("fast captioner: only decoder-only language models (BLIP-2 OPT); "
                             "use the stock image_captioning_mapper for encoder-decoder ones (flan-t5)")
        if getattr(self.lm.config, "final_logit_softcapping", None):
            raise ValueError("fast captioner: logit soft-capping is not implemented")
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        if cuda and bf16 and next(model.parameters()).dtype != torch.bfloat16:
            model.to(torch.bfloat16)
        self.caption_num, self.max_new_tokens = int(caption_num), int(max_new_tokens)
        self.gc = resolve_generation_config(model, self.max_new_tokens)
        eos = self.gc.eos_token_id if isinstance(self.gc.eos_token_id, list) else [self.gc.eos_token_id]
        self.eos = torch.tensor(eos, device=self.device)
        self.pad = self.gc.pad_token_id if self.gc.pad_token_id is not None else eos[0]
        out = self.lm.get_output_embeddings()
        vocab = out.weight.shape[0]
        suppressed = sorted({int(t) for t in (self.gc.suppress_tokens or []) if 0 <= int(t) < vocab})
        if suppressed:  # only the rows that can be sampled: same distribution, a fraction of the head
            keep = torch.ones(vocab, dtype=torch.bool)
            keep[suppressed] = False
            self.allowed = keep.nonzero().squeeze(1).to(self.device)             # (V',)
            self.head = out.weight[self.allowed].detach()                          # (V', H)
            self.bias = None if out.bias is None else out.bias[self.allowed].detach()
        else:
            self.allowed, self.head, self.bias = None, out.weight, out.bias
        self.base = self.lm.base_model
        self.compiled = compile is True and cuda
        self.pad_rows = pad_rows if self.compiled else None
        self._step = torch.compile(self._logits, mode="reduce-overhead", dynamic=False) if self.compiled else self._logits
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self.last_steps = 0  # decoding steps of the last sub-batch (the bench checks 128 were forced)

    def _logits(self, ids, positions, mask, cache) -> torch.Tensor:
        """One decoding step: ids (R, 1), positions (R, 1), mask (R, L) -> warped logits (R, V') float32."""
        hidden = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True).last_hidden_state[:, -1]                 # (R, H)
        return _warp(F.linear(hidden, self.head, self.bias).float(), self.gc)

    def _cache(self, rows: int, length: int) -> StaticCache:
        key = (rows, length)
        if key not in self._caches:  # one per shape: the compiled graphs keep pointers to its tensors
            self._caches[key] = StaticCache(config=self.lm.config, max_cache_len=length)
        cache = self._caches[key]
        cache.reset()
        return cache

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        idx = torch.multinomial(logits.softmax(-1), 1).squeeze(1) if self.gc.do_sample else logits.argmax(-1)
        return idx if self.allowed is None else self.allowed[idx]

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) images [+ (B, T) prompt ids with image slots] -> (B * caption_num, T + steps) ids,
        rows grouped by image, as generate(num_return_sequences=caption_num) returns them."""
        model, n, dev = self.model, self.caption_num, self.device
        B = pixel_values.shape[0]
        dtype = self.lm.get_input_embeddings().weight.dtype
        if input_ids is None:  # as Blip2ForConditionalGeneration.generate builds it without a prompt
            start = [model.config.image_token_index] * model.config.num_query_tokens + [self.lm.config.bos_token_id]
            input_ids = torch.tensor([start], dtype=torch.long).repeat(B, 1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pixel_values, input_ids, attention_mask = (t.to(dev, non_blocking=True) for t in
                                                   (pixel_values, input_ids, attention_mask))
        real = B
        if self.pad_rows and B < self.pad_rows:  # one shape for the compiled step: repeat the last image
            extra = self.pad_rows - B
            pixel_values, input_ids, attention_mask = (torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])
                                                       for t in (pixel_values, input_ids, attention_mask))
            B = self.pad_rows
        feats = model.get_image_features(pixel_values.to(next(model.vision_model.parameters()).dtype),
                                         return_dict=True).pooler_output          # (B, Q, D)
        embeds = self.lm.get_input_embeddings()(input_ids)                         # (B, T, D)
        slots = (input_ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, feats.to(dtype))
        # every candidate of an image is a row of its own: (R, ...) with R = B * n
        embeds, ids, mask = (t.repeat_interleave(n, dim=0) for t in (embeds, input_ids, attention_mask))
        R, T = ids.shape
        L = T + self.max_new_tokens
        sliced = not self.compiled and bool(mask.all())  # padded prompts need the mask: whole-cache attention
        config, attention = self.lm.config, self.lm.config._attn_implementation
        config._attn_implementation = SLICED if sliced else "sdpa"
        try:
            return self._decode(embeds, ids, mask, R, T, L)[: real * n]
        finally:
            config._attn_implementation = attention

    def _decode(self, embeds, ids, mask, R, T, L) -> torch.Tensor:
        dev = self.device
        full = torch.ones(R, L, dtype=mask.dtype, device=dev)                     # (R, L): prompt mask, then 1s
        full[:, :T] = mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)                             # (R, T) as OPT derives them
        cache = self._cache(R, L)
        _FILLED["length"] = T
        hidden = self.base(inputs_embeds=embeds, attention_mask=full, position_ids=positions, past_key_values=cache,
                           use_cache=True).last_hidden_state[:, -1]
        token = self._sample(_warp(F.linear(hidden, self.head, self.bias).float(), self.gc))    # (R,)
        done = torch.isin(token, self.eos)
        out = [token]
        position = positions[:, -1:] + 1                                           # (R, 1)
        steps = 1
        while steps < self.max_new_tokens and not bool(done.all()):
            _FILLED["length"] = T + steps  # after this step's update: the prompt and `steps` tokens
            logits = self._step(token[:, None], position, full, cache)
            token = torch.where(done, torch.full_like(token, self.pad), self._sample(logits))
            out.append(token)
            done = done | torch.isin(token, self.eos)
            position = position + 1
            steps += 1
        self.last_steps = steps
        return torch.cat([ids, torch.stack(out, dim=1)], dim=1)

    def captions(self, inputs: dict) -> list[list[str]]:
        """Processor outputs of B images -> B lists of caption_num captions (the stock op's decoding)."""
        ids = self.generate(inputs["pixel_values"], inputs.get("input_ids"), inputs.get("attention_mask"))
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        n = self.caption_num
        return [texts[i * n:(i + 1) * n] for i in range(len(texts) // n)]
