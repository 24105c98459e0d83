"""Fast sampled captioning for BLIP-2-style captioners: every candidate of a sub-batch in one decode.

Data-Juicer's image_captioning_mapper calls `model.generate(max_new_tokens=128, do_sample=True)` once per
candidate (caption_num times per sub-batch): the vision towers run caption_num times, the dynamic KV cache
is re-concatenated at every step and each step is ~40 kernel launches per layer from Python. Here:
- the image features and the prompt's prefill are computed once per image; its keys/values are copied to
  the caption_num rows of the image and the first token is sampled per row, so one decode samples all
  candidates (rows [i*n, (i+1)*n) belong to image i);
- the KV cache is a transformers `StaticCache` of fixed length (prompt + max_new_tokens): nothing is
  concatenated or copied as captions grow. When no prompt is padded (the usual case: one prompt, or
  none) every row has the same length and a step attends to the filled slots only:
  - on CUDA with Triton (compile="auto"): a Triton kernel (vlmlab.synth.decode_attention) that reads the
    filled length on the GPU and the prompt's slots from the image's first row, and every step is one
    replay of a CUDA graph captured once per shape (measured on an H200: SDPA's cuDNN kernel was 55% of
    a 768-row OPT-2.7b step, bench/results/synth_profile.txt);
  - otherwise (CPU, compile=False): SDPA over a view of the first `length` slots, no mask.
  `compile=True` instead keeps every step the same shape (masked attention over the whole cache) and
  compiles it with torch.compile mode "reduce-overhead"; padded prompts take the masked attention eagerly;
- the loop stops as soon as every row has emitted EOS (at most max_new_tokens steps). On CUDA the check
  reads a flag `stop_lag` steps behind the GPU (a pinned copy and an event), so the host never drains the
  step queue; the steps drawn after the last row ended are cut off, so the output is what a per-step check
  gives (the extra draws move the global generator, so later sub-batches sample other, equally distributed,
  captions than with stop_lag=0, the CPU's setting);
- the LM head keeps only the rows generation_config.suppress_tokens allows (the tiny teacher suppresses
  all but its few hundred world words): the same distribution as transformers' SuppressTokens processor,
  which sets those logits to -inf.
Sampling follows transformers' generate for do_sample=True: the generation config is resolved the way
generate resolves it (model's generation_config, then transformers' global defaults, e.g. top_k=50), then
suppress -> temperature -> top-k -> top-p -> softmax -> torch.multinomial on the global torch generator
(outside any graph), so `torch.manual_seed` fixes the captions. On CUDA a step does this on its top_k + 64
highest logits only, the same distribution (FastCaptioner._candidate_count). Options generate would apply and this loop
does not (repetition penalty, beams, min length, ...) are refused with a clear error rather than ignored.
The output is what the stock op decodes: prompt ids + new ids (finished rows padded with pad_token_id),
`batch_decode(skip_special_tokens=True)`.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache, StaticCache

from vlmlab.synth import decode_attention as DA
from vlmlab.synth.teacher_generate import _warp

SLICED = "vlmlab_sliced_sdpa"
# the decode under way (one at a time per process): `length` filled slots (SDPA path); `lengths` the cache
# layers' filled-length tensors, `group`/`shared` the rows per image and prompt slots, `config` the
# kernel's block shape (Triton path, None: SDPA)
_FILLED = {"length": 0, "lengths": None, "group": 1, "shared": 0, "config": (16, 1)}


def sliced_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the filled slots of a static cache, rows of equal length (no mask): causal for the
    prefill (query as long as the filled part), unmasked for a one-token decoding step.
    query (B, H, q, d), key/value (B, H, L, d) -> (B, q, H, d) as transformers' attention functions return."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.shape[2] == 1 and _FILLED["lengths"] is not None:
        out = DA.decode_attention(query, key, value, _FILLED["lengths"][module.layer_idx], scale,
                                  _FILLED["group"], _FILLED["shared"], _FILLED["config"])
        return out, None
    n = _FILLED["length"]
    out = F.scaled_dot_product_attention(query, key[:, :, :n], value[:, :, :n], is_causal=query.shape[2] > 1,
                                         scale=scale)
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


class StopCheck:
    """Whether every row has emitted EOS, step by step. `lag` 0: read on the host at each step (a sync).
    `lag` k: each step's flag goes to pinned host memory behind an event and is read k steps later, when
    the GPU has long passed it, so k steps stay queued; `steps()` then counts the steps really needed."""

    def __init__(self, lag: int, done: torch.Tensor):
        self.lag, self.flags = lag, []
        self.pinned = lag and done.is_cuda  # (a CPU run reads its flags directly: no sync to avoid)
        if self.pinned:
            self.host = torch.zeros(lag + 1, dtype=torch.bool, pin_memory=True)
            self.events = [torch.cuda.Event() for _ in range(lag + 1)]
        self.push(done)

    def push(self, done: torch.Tensor) -> None:
        flag = done.all()
        self.flags.append(flag)
        if self.pinned:
            slot = (len(self.flags) - 1) % (self.lag + 1)
            self.host[slot].copy_(flag, non_blocking=True)
            self.events[slot].record()

    def known(self) -> bool:
        """Every row had ended `lag` steps ago (0: now)."""
        k = len(self.flags) - 1 - self.lag
        if k < 0:
            return False
        if not self.pinned:
            return bool(self.flags[k])
        self.events[k % (self.lag + 1)].synchronize()
        return bool(self.host[k % (self.lag + 1)])

    def steps(self) -> int:
        """Steps up to the one where the last row ended (all of them if one never did): one sync."""
        ended = torch.stack(self.flags).nonzero()
        return int(ended[0]) + 1 if len(ended) else len(self.flags)


class FastCaptioner:
    """caption_num sampled captions per image from a `Blip2ForConditionalGeneration`-like model (decoder-only LM).

    :param compile: "auto": on CUDA with Triton, the Triton decode attention and one CUDA graph per step
        shape; elsewhere eager steps with SDPA over the filled slots. False: eager SDPA steps. True:
        torch.compile "reduce-overhead" of a masked whole-cache step (slower: kept for comparison)
    :param bf16: on CUDA, run the model in bfloat16 (casts it once, in place)
    :param pad_rows: on a compiled step, pad every sub-batch to this many images so the graphs see one shape
    :param stop_lag: on CUDA, steps the all-rows-ended check trails the GPU by (0: a host sync every step)
    """

    def __init__(self, model, processor, caption_num: int = 1, max_new_tokens: int = 128, compile: bool | str = "auto",
                 bf16: bool = True, pad_rows: int | None = None, stop_lag: int = 2):
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
        self.stop_lag = int(stop_lag) if cuda else 0
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
        self.candidates = 0  # set per sub-batch from the generation config (_candidate_count)
        self.overflowed = 0  # sub-batches redone on the whole vocabulary (ties past the candidates)
        self.compiled = compile is True and cuda
        self.triton = self.graphs = compile == "auto" and DA.available(self.device)  # the kernel + CUDA graphs
        self.mode = "compiled" if self.compiled else "triton, graphs" if self.graphs else "eager"
        self.pad_rows = pad_rows if self.compiled else None
        self._step = torch.compile(self._probs, mode="reduce-overhead", dynamic=False) if self.compiled else self._probs
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self._graphs: dict[tuple[int, int, int], dict] = {}
        self._pool = None
        self.attention_config = None  # the Triton kernel's (BLOCK_N, num_warps), picked on the first decode
        self.last_steps = 0  # decoding steps of the last sub-batch (the bench checks 128 were forced)

    TIE_MARGIN = 64  # candidates kept past top_k, for logits tied with the k-th (bf16 logits tie often)
    CANDIDATES = None  # sample among top_k + TIE_MARGIN candidates (None: on CUDA; the tests set it on a CPU)

    def _candidate_count(self) -> int:
        """How many of the highest logits a step samples among (0: the whole vocabulary). transformers' top-k
        keeps every token whose logit is at least the k-th, ties included, and top-p only removes from that
        set: so where no tie with the k-th reaches the last candidate the two draw from one distribution,
        and the steps skip the softmax and multinomial over 50k tokens (~7 % of an OPT-2.7b step, H100)."""
        on = self.device.type == "cuda" if self.CANDIDATES is None else self.CANDIDATES
        k = self.gc.top_k or 0
        return k + self.TIE_MARGIN if on and self.gc.do_sample and 0 < k and k + self.TIE_MARGIN < len(self.head) else 0

    def _warped(self, hidden) -> torch.Tensor:
        return _warp(F.linear(hidden, self.head, self.bias).float(), self.gc)

    def _probs(self, ids, positions, mask, cache) -> tuple:
        """One decoding step: ids (R, 1), positions (R, 1), mask (R, L) -> (probabilities (R, C) float32,
        their columns of the head (R, C) or None for all V', tie overflow (R,) bool or None): see _sample."""
        hidden = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True).last_hidden_state[:, -1]                 # (R, H)
        return self._sample(hidden)

    def _sample(self, hidden) -> tuple:
        if not self.candidates:
            return self._warped(hidden).softmax(-1), None, None
        values, columns = F.linear(hidden, self.head, self.bias).float().topk(self.candidates, dim=-1)  # (R, C)
        warped = _warp(values, self.gc)
        # ties with the k-th after the temperature (a monotone division: no token outside the candidates lies
        # above the last one) reaching the last candidate: tokens outside may tie too
        scaled = values if self.gc.temperature in (None, 1.0) else values / self.gc.temperature
        overflow = scaled[:, -1] >= scaled[:, self.gc.top_k - 1]
        return warped.softmax(-1), columns, overflow

    def _cache(self, rows: int, length: int, zero: bool) -> StaticCache:
        key = (rows, length)
        if key not in self._caches:  # one per shape: captured graphs keep pointers to its tensors
            self._caches[key] = StaticCache(config=self.lm.config, max_cache_len=length)
        cache = self._caches[key]
        for layer in cache.layers:
            if zero and layer.is_initialized:  # the masked path reads every slot: stale ones must be finite
                layer.keys.zero_()
                layer.values.zero_()
            layer.cumulative_length.zero_()
        return cache

    def _draw(self, probs: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        idx = torch.multinomial(probs, 1).squeeze(1) if self.gc.do_sample else probs.argmax(-1)
        if columns is not None:
            idx = columns.gather(1, idx[:, None]).squeeze(1)
        return idx if self.allowed is None else self.allowed[idx]

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) images [+ (B, T) prompt ids with image slots] -> (B * caption_num, T + steps) ids,
        rows grouped by image, as generate(num_return_sequences=caption_num) returns them."""
        model, dev = self.model, self.device
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
        sliced = not self.compiled and bool(attention_mask.all())  # padded prompts need the mask: whole-cache attention
        config, attention = self.lm.config, self.lm.config._attn_implementation
        config._attn_implementation = SLICED if sliced else "sdpa"
        try:
            self.candidates = self._candidate_count()
            ids, overflow = self._decode(embeds, input_ids, attention_mask, sliced)
            if overflow:  # a tie with the k-th logit reached the last candidate: redo it on the whole vocabulary
                self.overflowed += 1
                candidates, self.candidates = self.candidates, 0
                try:
                    ids, _ = self._decode(embeds, input_ids, attention_mask, sliced)
                finally:
                    self.candidates = candidates
            return ids[: real * self.caption_num]
        finally:
            config._attn_implementation = attention
            _FILLED["lengths"] = None

    def _prefill(self, embeds, ids, mask, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt once per image; its keys/values into the rows of the image's candidates.
        -> (warped first-token logits (R, V'), positions (B, T))."""
        n, T = self.caption_num, ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)                             # (B, T) as OPT derives them
        _FILLED["length"] = T
        prompt = DynamicCache(config=self.lm.config)
        hidden = self.base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                           past_key_values=prompt, use_cache=True).last_hidden_state[:, -1]
        for src, dst in zip(prompt.layers, cache.layers):
            dst.update(src.keys.repeat_interleave(n, dim=0), src.values.repeat_interleave(n, dim=0))
        return self._warped(hidden).repeat_interleave(n, dim=0), positions

    def _decode(self, embeds, ids, mask, sliced) -> tuple[torch.Tensor, bool]:
        n, dev = self.caption_num, self.device
        B, T = ids.shape
        R, L = B * n, T + self.max_new_tokens
        cache = self._cache(R, L, zero=not sliced)
        logits, positions = self._prefill(embeds, ids, mask, cache)
        token = self._draw(logits.softmax(-1))                                     # (R,)
        overflow = torch.zeros(R, dtype=torch.bool, device=dev)
        ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
        full = torch.ones(R, L, dtype=mask.dtype, device=dev)                     # (R, L): prompt mask, then 1s
        full[:, :T] = mask
        done = torch.isin(token, self.eos)
        out = [token]
        position = positions[:, -1:].repeat_interleave(n, dim=0) + 1               # (R, 1)
        triton = self.triton and sliced
        if triton:
            _FILLED.update(lengths=[layer.cumulative_length for layer in cache.layers], group=n, shared=T)
            triton = self._pick_attention_config(cache, R, L)
        graphs = triton and self.graphs
        steps = 1
        ended = StopCheck(self.stop_lag, done)
        while steps < self.max_new_tokens and not ended.known():
            _FILLED["length"] = T + steps  # after this step's update: the prompt and `steps` tokens
            if graphs:
                step = self._replay(token, position, full, cache, T + steps - 1)
                if step is None:  # capture failed: eager steps (still with the kernel) from here on
                    graphs = self.graphs = False
                    self.mode = "triton, eager (graph capture failed)"
            if not graphs:
                step = self._step(token[:, None], position, full, cache)
            probs, columns, tied = step
            if tied is not None:
                overflow |= tied & ~done
            token = torch.where(done, torch.full_like(token, self.pad), self._draw(probs, columns))
            out.append(token)
            done = done | torch.isin(token, self.eos)
            ended.push(done)
            position = position + 1
            steps += 1
        self.last_steps = steps = ended.steps()
        return torch.cat([ids, torch.stack(out[:steps], dim=1)], dim=1), bool(overflow.any())

    def _replay(self, token, position, full, cache, filled: int) -> tuple | None:
        """One step as a CUDA graph replay (captured on the first step of this shape) -> what _probs returns,
        buffers the next replay overwrites; None where the capture failed (the cache is left as it was)."""
        key = (full.shape[0], full.shape[1], self.candidates)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(token, position, full, cache)
            except Exception as e:  # noqa: BLE001 - any capture failure: fall back to eager steps
                warnings.warn(f"fast captioner: CUDA graph capture failed ({type(e).__name__}: {e}); eager steps")
                for layer in cache.layers:
                    layer.cumulative_length.fill_(filled)
                return None
            self._graphs[key] = entry
        entry["ids"].copy_(token[:, None])
        entry["positions"].copy_(position)
        entry["graph"].replay()
        return entry["out"]

    def _pick_attention_config(self, cache, R: int, L: int) -> bool:
        """The Triton kernel's block shape, timed once on this cache at its full length; False (and SDPA
        from then on) where the kernel fails."""
        if self.attention_config is None:
            layer = cache.layers[0]
            H, d = layer.keys.shape[1], layer.keys.shape[-1]
            query = torch.randn(R, 1, H, d, dtype=layer.keys.dtype, device=self.device).transpose(1, 2)
            try:
                self.attention_config = DA.pick_config(query, layer.keys, layer.values, torch.tensor(L, device=self.device),
                                                       d ** -0.5, _FILLED["group"], _FILLED["shared"])
            except Exception as e:  # noqa: BLE001 - a Triton build or launch failure: SDPA works everywhere
                warnings.warn(f"fast captioner: the Triton decode attention failed ({type(e).__name__}: {e}); SDPA")
                self.triton = self.graphs = False
                self.mode = "eager (Triton failed)"
                _FILLED["lengths"] = None
                return False
        _FILLED["config"] = self.attention_config
        return True

    def _capture(self, token, position, full, cache) -> dict:
        entry = {"ids": token[:, None].clone(), "positions": position.clone(), "full": full.clone()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS workspaces, kernel compilation)
            self._probs(entry["ids"], entry["positions"], entry["full"], cache)
        torch.cuda.current_stream().wait_stream(side)
        for layer in cache.layers:  # the warm-up filled this step's slot; the replay writes it again
            layer.cumulative_length.sub_(1)
        if self._pool is None:  # one pool for every shape: their graphs never run at the same time
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the op's preprocessing threads pin host memory while this thread captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            entry["out"] = self._probs(entry["ids"], entry["positions"], entry["full"], cache)
        entry["graph"] = graph
        return entry

    def captions(self, inputs: dict) -> list[list[str]]:
        """Processor outputs of B images -> B lists of caption_num captions (the stock op's decoding)."""
        ids = self.generate(inputs["pixel_values"], inputs.get("input_ids"), inputs.get("attention_mask"))
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        n = self.caption_num
        return [texts[i * n:(i + 1) * n] for i in range(len(texts) // n)]
