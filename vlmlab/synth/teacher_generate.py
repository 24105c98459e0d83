"""Sampling for the tiny teacher, shipped inside its folder as `custom_generate/generate.py`.

Why this exists: Data-Juicer's image_captioning_mapper calls `model.generate(..., do_sample=True)`, and
transformers' sampler draws from all 50272 OPT logits at every step (softmax + `torch.multinomial`,
whose CPU kernel draws one exponential per vocabulary entry). On a CPU that costs ~3 ms per generated
token, whatever the model size: 30k captions would take half an hour. The teacher's vocabulary is a
few hundred world words; every other id is a filler that only keeps OPT's layout, and its
`generation_config.suppress_tokens` lists them all. transformers' own generate therefore samples from
exactly the distribution this function samples from (suppress -> temperature -> top-k -> top-p ->
multinomial); this one just never computes the suppressed rows.

transformers loads this file in place of `generate` when the model is loaded with
`trust_remote_code=True` (Data-Juicer's `trust_remote_code` op argument). Without it the standard
generate runs: same distribution, slower. Self-contained on purpose (transformers copies only this file).
"""
import torch


@torch.no_grad()
def generate(model, pixel_values, input_ids=None, attention_mask=None, max_new_tokens=None, do_sample=None,
             generation_config=None, **kwargs):
    """BLIP-2 generation: `<image>` x Q slots filled with projected Q-Former outputs, then sampled text.

    Returns (B, prompt_len + new) token ids like transformers' decoder-only generate (finished rows padded).
    """
    gc = generation_config or model.generation_config
    unsupported = {k: v for k, v in kwargs.items() if k not in ("interpolate_pos_encoding", "return_dict_in_generate")}
    if unsupported or (gc.num_beams or 1) > 1 or (gc.repetition_penalty or 1.0) != 1.0:
        raise ValueError(f"teacher generate supports sampling/greedy only, got {sorted(unsupported) or gc}")
    max_new_tokens = max_new_tokens if max_new_tokens is not None else (gc.max_new_tokens or 20)
    do_sample = gc.do_sample if do_sample is None else do_sample
    lm = model.language_model  # OPTForCausalLM
    B = pixel_values.shape[0]
    device = pixel_values.device

    features = model.get_image_features(pixel_values.to(model.dtype), return_dict=True).pooler_output  # (B, Q, H)
    if input_ids is None:  # as transformers does without a prompt: image slots + BOS
        start = [model.config.image_token_index] * model.config.num_query_tokens + [gc.bos_token_id]
        input_ids = torch.tensor([start], dtype=torch.long, device=device).repeat(B, 1)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    embeds = lm.get_input_embeddings()(input_ids)  # (B, T, H)
    slots = (input_ids == model.config.image_token_index).unsqueeze(-1)
    embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))

    suppressed = torch.tensor(sorted(set(gc.suppress_tokens or [])), dtype=torch.long, device=device)
    allowed = torch.ones(lm.config.vocab_size, dtype=torch.bool, device=device)
    allowed[suppressed] = False
    allowed_ids = allowed.nonzero().squeeze(1)  # (V',)
    head = lm.get_output_embeddings().weight[allowed_ids]  # (V', H): only rows that can be sampled
    eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    eos = torch.tensor(eos, device=device)
    pad = gc.pad_token_id if gc.pad_token_id is not None else eos[0].item()

    cache, out = None, []
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    step_input = dict(inputs_embeds=embeds)
    for _ in range(max_new_tokens):
        hidden = lm.model.decoder(**step_input, attention_mask=attention_mask, past_key_values=cache,
                                  use_cache=True, return_dict=True)
        cache = hidden.past_key_values
        logits = hidden.last_hidden_state[:, -1].float() @ head.float().T  # (B, V')
        if do_sample:
            logits = _warp(logits, gc)
            idx = torch.multinomial(logits.softmax(-1), 1).squeeze(1)  # (B,)
        else:
            idx = logits.argmax(-1)
        token = torch.where(unfinished, allowed_ids[idx], torch.full_like(idx, pad))
        out.append(token)
        unfinished &= ~torch.isin(token, eos)
        if not unfinished.any():
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        step_input = dict(input_ids=token[:, None])
    return torch.cat([input_ids, torch.stack(out, dim=1)], dim=1)


def _warp(logits, gc):
    """transformers' sampling warpers, in its order: temperature, top-k, top-p."""
    if gc.temperature is not None and gc.temperature != 1.0:
        logits = logits / gc.temperature
    if gc.top_k and gc.top_k < logits.shape[-1]:
        kth = logits.topk(gc.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gc.top_p is not None and gc.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - gc.top_p)
        drop[:, -1] = False  # keep at least one
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits
