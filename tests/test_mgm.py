"""MgmForConditionalGeneration: shapes, splice check, mining locality, save/load, KV cache, padding."""
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from vlmlab.models import MgmForConditionalGeneration, presets
from vlmlab.sim.lm_tokenizer import train_world_tokenizer

TEXTS = ["a small red circle on the left .", "a large blue square in the middle .",
         "what does the sign say ?", "the sign says hello .", "how many shapes are there ? two"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = presets.build("tiny", train_world_tokenizer(TEXTS))
    with torch.no_grad():  # random init is near-uniform: spread the weights so outputs differ per input
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    return model.eval(), processor


def images(n):
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(96, 96, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def prompts(processor, n=3):
    qs = ["what does the sign say ?", "how many shapes are there ?", "a small red circle on the left . what"]
    return processor.pad([processor.encode_prompt(q, im) for q, im in zip(qs[:n], images(n))], "left")


def test_forward_shapes_and_loss(tiny):
    model, processor = tiny
    conv = [{"from": "human", "value": "<image>\nwhat does the sign say ?"}, {"from": "gpt", "value": "hello"}]
    batch = processor.pad([processor.encode_conversation(conv, im) for im in images(2)], "right")
    out = model(**batch)
    B, T = batch["input_ids"].shape
    assert out.logits.shape == (B, T, model.config.text_config.vocab_size)
    assert out.image_hidden_states.shape == (B, model.config.num_image_tokens, model.config.text_config.hidden_size)
    assert torch.isfinite(out.loss)
    assert (batch["labels"] != -100).sum(1).tolist() == [4, 4]  # "hello" <end_of_turn> \n <eos>


def test_image_token_count_is_checked(tiny):
    model, processor = tiny
    batch = prompts(processor, 2)
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == processor.image_token_id).nonzero()[0]] = processor.tokenizer.unk_token_id  # one slot short
    with pytest.raises(ValueError, match="do not match"):
        model(input_ids=ids, attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"], pixel_values_aux=batch["pixel_values_aux"])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="no pixel_values"):  # generate's prefill comes with an empty cache
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2)


def test_patch_mining_stays_inside_each_patch(tiny):
    model, _ = tiny
    cfg = model.config
    n, G = int(cfg.num_image_tokens ** 0.5), cfg.aux_grid
    p = G // n
    tokens = torch.randn(1, n * n, cfg.mm_hidden_size)
    aux = torch.randn(1, cfg.mm_hidden_size_aux, G, G)
    with torch.no_grad():
        base = model.mine_patches(tokens, aux)
        aux2 = aux.clone()
        aux2[:, :, p:2 * p, 0:p] = torch.randn(1, cfg.mm_hidden_size_aux, p, p) # the patch of token (row 1, col 0) = index n
        moved = (model.mine_patches(tokens, aux2) - base).abs().amax(-1)[0]
    assert moved[n] > 1e-3 and torch.all(moved[torch.arange(n * n) != n] == 0)


def test_save_load_identical_logits(tiny, tmp_path):
    model, processor = tiny
    batch = prompts(processor)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "mgm"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is MgmForConditionalGeneration
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_attention_implementations_agree(tiny, tmp_path):
    model, processor = tiny
    batch = prompts(processor)
    model.save_pretrained(tmp_path)
    eager = MgmForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.language_model.config._attn_implementation == "eager"
    sdpa = MgmForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert sdpa.language_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        a, b = model(**batch).logits, eager(**batch).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(a[mask], b[mask], atol=1e-4)


def test_cached_generation_equals_uncached(tiny):
    model, processor = tiny
    batch = prompts(processor)
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kw)
        plain = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.logits, plain.logits):
        assert torch.allclose(a, b, atol=1e-4)
    new = cached.sequences[:, batch["input_ids"].shape[1]:]
    assert len({tuple(r.tolist()) for r in new}) > 1, "outputs should depend on the input"


def test_left_padded_batch_equals_one_by_one(tiny):
    model, processor = tiny
    batch = prompts(processor)
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)[:, T:]
        for i in range(3):
            mask = batch["attention_mask"][i].bool()
            one = {"input_ids": batch["input_ids"][i:i + 1, mask], "pixel_values": batch["pixel_values"][i:i + 1],
                   "pixel_values_aux": batch["pixel_values_aux"][i:i + 1]}
            alone = model.generate(**one, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            assert torch.equal(alone[0, int(mask.sum()):], together[i])


def test_mgm_2b_preset_has_mgm_2b_shapes():
    config = presets.build_config("mgm-2b")
    assert (config.mm_hidden_size, config.mm_hidden_size_aux, config.num_image_tokens) == (1024, 2880, 576)
    assert config.aux_grid % 24 == 0  # 192 x 192 ConvNeXt grid: each of 24 x 24 tokens mines 8 x 8
    with torch.device("meta"):
        model = MgmForConditionalGeneration(config)
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    assert count["mm_projector"] == 1024 * 2048 + 2048 + 2048 * 2048 + 2048
    assert count["vlm_uni_aux_projector"] == 2 * 2880 + 2880 * 1024 + 1024
    assert count["language_model"] == 2_506_172_416  # Gemma-2B (tied embeddings)
    assert count["vision_tower"] == 303_507_456      # CLIP ViT-L/14-336 vision model


def test_gemma_text_embeddings_equal_the_lm_s_own(tiny):
    # embed_inputs scales the whole input as transformers 4.38 did; for text alone (fp32) that is
    # exactly what the LM's own scaled embedding gives, so the LM pretrained alone reads the same inputs
    model, processor = tiny
    ids = processor.prompt_ids("what does the sign say ?")[None]
    assert model.config.text_config.model_type == "gemma"
    with torch.no_grad():
        assert torch.equal(model.embed_inputs(ids), model.language_model.get_input_embeddings()(ids))
