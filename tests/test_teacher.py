"""The tiny BLIP-2 teacher: OPT layout, Data-Juicer-style loading, exact fast sampling, learns to stop."""
import copy
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import AutoProcessor

from vlmlab.io import StageError
from vlmlab.sim import teacher as T
from vlmlab.synth import captioner as C
from vlmlab.sim.teacher_tokenizer import IMAGE_TOKEN_ID, LM_VOCAB_SIZE, build_tokenizer, caption_words
from vlmlab.sim.text import world_words
from vlmlab.sim.vocab import SIGN_WORDS

COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square")
SIDES = {"left": 20, "right": 70}


def standin(n: int, seed: int = 0, size: int = 32):
    """Tiny images with one coloured shape somewhere, and a caption naming its colour and shape."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(n):
        color, shape, side = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(SIDES))
        im = Image.new("RGB", (96, 96), (240, 240, 240))
        x, r = SIDES[side], 16
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(
            [x - r, 48 - r, x + r, 48 + r], fill=COLORS[color])
        images.append(im.resize((size, size)))
        captions.append(f"a {color} {shape}.")
    return images, captions


TINY = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, qformer_hidden=32, qformer_layers=1,
            num_query_tokens=4, hidden=32, layers=1, heads=2, batch_size=16, lr=3e-3, max_words=40, encoder_images=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, captions = standin(192)
        cfg = T.TeacherConfig(epochs=12, **TINY)
        model, processor = T.build_teacher(cfg, caption_words(captions))
        stats = T.train_teacher(model, processor, images, captions, cfg, seed=0)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    T.save_teacher(model, processor, out)
    return out, stats


def test_tokenizer_keeps_opt_layout_and_round_trips_world_text():
    tok = build_tokenizer(world_words())
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert len(tok) == IMAGE_TOKEN_ID  # Blip2Processor appends <image> right here
    text = "a photo of two shapes: a large red circle on the left and a small blue square. a sign at the top reads gym."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 2 and 3 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_saved_teacher_loads_like_data_juicer_and_fits_its_generate_call(trained):
    out, _ = trained
    processor = AutoProcessor.from_pretrained(out)
    model, _ = C.load_captioner(out)  # AutoConfig -> getattr(transformers, architectures[0])
    assert type(model).__name__ == "Blip2ForConditionalGeneration"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    assert model.config.text_config.vocab_size == LM_VOCAB_SIZE
    q = model.config.num_query_tokens
    assert model.config.text_config.max_position_embeddings >= q + 1 + C.MAX_NEW_TOKENS


def test_caption_loss_over_all_rows_equals_forward_loss():
    torch.manual_seed(0)
    images, captions = standin(4)
    model, processor = T.build_teacher(T.TeacherConfig(epochs=8, **TINY), caption_words(captions))
    batch = T.encode_captions(processor, captions, 20)
    batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(**batch)  # logits (B, T, V) over the whole prompt: image slots, BOS, caption, EOS
        assert T.caption_loss(model, batch).item() == pytest.approx(out.loss.item(), rel=1e-5)
        # over the allowed rows: forward's logits with the suppressed columns masked out, same shift as forward
        allowed = T.allowed_token_ids(model)
        keep = torch.zeros(out.logits.shape[-1], dtype=torch.bool)
        keep[allowed] = True
        masked = out.logits.masked_fill(~keep, float("-inf"))
        ref = F.cross_entropy(masked[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        assert T.caption_loss(model, batch, allowed).item() == pytest.approx(ref.item(), rel=1e-5)


def test_frozen_encoders_cached_output_is_what_generation_sees():
    """Pretraining feeds the Q-Former the tower's cached output, caption training the Q-Former's cached
    output: both must be exactly what get_image_features (used by generate) computes from pixels."""
    torch.manual_seed(0)
    images, captions = standin(6)
    model, processor = T.build_teacher(T.TeacherConfig(epochs=1, **TINY), caption_words(captions))
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model.get_image_features(pixels, return_dict=True).pooler_output
        queries = T.query_output(model, pixels)
        assert torch.equal(model.language_projection(queries), ref)
        embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        assert torch.equal(T.qformer_output(model, embeds), queries)
        assert not torch.equal(T.qformer_output(model, embeds.flip(0)), queries)
        batch = T.encode_captions(processor, captions, 20)
        with_pixels = T.caption_loss(model, {**batch, "pixel_values": pixels})
        assert torch.equal(T.caption_loss(model, {**batch, "query_output": queries}), with_pixels)


def test_pretrained_encoders_learn_the_labels_and_freeze():
    torch.manual_seed(0)
    cfg = T.TeacherConfig(epochs=1, **{**TINY, "image_size": 96, "patch_size": 16, "encoder_images": 256}, encoder_steps=30)
    model, processor = T.build_teacher(cfg, world_words())
    before = [p.detach().clone() for p in T.encoder_parameters(model)]
    stats = T.pretrain_encoders(model, processor, cfg, seed=3, render_size=96)
    assert not any(p.requires_grad for p in T.encoder_parameters(model))
    assert all(not torch.equal(a, b) for a, b in zip(before, T.encoder_parameters(model)))  # every part trained
    assert set(stats["vision"]) == set(stats["qformer"]) >= {"word", "count", "sign_side"}
    assert stats["vision"]["sign_side"] > 0.7  # two sides: it learnt something in 30 steps
    assert all(p.requires_grad for p in model.language_projection.parameters())


def test_teacher_learns_the_images_and_stops(trained):
    out, stats = trained
    assert stats["loss_last"] < 0.3 * stats["loss_first"]
    images, captions = standin(48, seed=1)
    model, processor = C.load_captioner(out)
    torch.manual_seed(0)
    got = C.caption_images(model, processor, images, batch_size=48, do_sample=False)
    colour = sum(g.split()[1:2] == c.split()[1:2] for g, c in zip(got, captions)) / len(got)
    exact = sum(g == c for g, c in zip(got, captions)) / len(got)
    assert colour >= 0.9 and exact >= 0.5, (colour, exact, got[:4])  # chance: 1/3 and 1/6: it reads the pixels
    inputs = processor(images=images, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=C.MAX_NEW_TOKENS, do_sample=True)
    assert ids.shape[1] < model.config.num_query_tokens + 1 + 20  # every sample hit </s> long before 128


def test_fast_sampler_matches_transformers_generate(trained):
    out, _ = trained
    images, _ = standin(16, seed=2)
    fast, processor = C.load_captioner(out, trust_remote_code=True)
    slow, _ = C.load_captioner(out, trust_remote_code=False)
    assert "custom_generate" in repr(fast.generate) or not hasattr(fast.generate, "__func__")
    greedy = [C.caption_images(m, processor, images, 16, do_sample=False) for m in (fast, slow)]
    assert greedy[0] == greedy[1]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_fast_sampler_warp_matches_transformers_processors(top_p):
    """Sampling: `_warp` over the allowed columns gives the distribution transformers' generate samples from."""
    from transformers import (LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    from vlmlab.synth.teacher_generate import _warp

    model, _ = T.build_teacher(T.TeacherConfig(epochs=8, **TINY), world_words())  # the real vocabulary: ~280 allowed ids
    gc = copy.deepcopy(model.generation_config)
    gc.top_p = top_p
    ids = T.allowed_token_ids(model)
    assert gc.do_sample and gc.temperature != 1.0 and 0 < gc.top_k < len(ids)  # each warper has work to do
    # generate's order (GenerationMixin._get_logits_processor): suppress_tokens, then the sampling warpers
    # temperature -> top-k -> top-p (top-p only when < 1)
    procs = LogitsProcessorList([SuppressTokensLogitsProcessor(gc.suppress_tokens), TemperatureLogitsWarper(gc.temperature),
                                 TopKLogitsWarper(gc.top_k)] + ([TopPLogitsWarper(gc.top_p)] if gc.top_p < 1.0 else []))
    torch.manual_seed(0)
    x = 3 * torch.randn(8, model.config.text_config.vocab_size)  # (B, V)
    ref = procs(torch.zeros(8, 1, dtype=torch.long), x.clone()).softmax(-1)  # (B, V)
    got = _warp(x[:, ids], gc).softmax(-1)  # (B, V')
    assert not ref.index_fill(1, ids, 0).any()  # no mass outside the allowed ids
    torch.testing.assert_close(got, ref[:, ids], rtol=1e-5, atol=1e-7)
    kept = (got > 0).sum(-1)
    if top_p < 1.0:
        assert (kept < gc.top_k).all() and (kept >= 1).all(), kept  # top-p cut inside the top-k
    else:
        assert (kept == gc.top_k).all(), kept


def test_broken_captioner_folder_is_one_clear_error(tmp_path):
    with pytest.raises(StageError, match="no config.json"):
        C.load_captioner(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(StageError, match="does not load"):
        C.load_captioner(tmp_path / "bad")


def test_sampled_score_is_the_mean_over_draws_and_the_first_draw_is_returned(monkeypatch):
    from vlmlab.evaluate.captions import caption_scores
    from vlmlab.synth import scoring

    rows = [{"id": "a", "captions": ["a red circle on the left. a sign reads taxi.", "a red circle. the sign says taxi."]},
            {"id": "b", "captions": ["a blue square on the right. a sign reads tea.", "a blue square. tea is on the sign."]}]
    d = (["a red circle. a sign reads taxi.", "a green circle. a sign reads cake."],
         ["a blue circle. a sign reads gate.", "a blue square. a sign reads tea."],
         ["a red circle on the left. a sign reads taxi.", "a red square. a sign reads tea."])
    draws = iter(d)
    greedy = ["a red circle. a sign reads taxi.", "a blue square. a sign reads cake."]
    monkeypatch.setattr(scoring, "caption_images",
                        lambda m, p, ims, bs, do_sample: next(draws) if do_sample else greedy)
    refs = {r["id"]: r["captions"] for r in rows}
    expect = [caption_scores(dict(zip("ab", x)), refs)["cider"] for x in d]
    assert len(set(expect)) == 3  # the draws score differently, so a mean is distinguishable from any one
    metrics, sampled = scoring.score_teacher(None, None, rows, [None, None], None, 2, samples=3, sign_words=SIGN_WORDS)
    assert metrics["teacher_sampled"]["cider"] == pytest.approx(sum(expect) / 3)
    assert metrics["teacher_sampled"]["sign_word_acc"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert sampled == dict(zip("ab", d[0]))
    assert metrics["teacher_greedy"] == {**caption_scores(dict(zip("ab", greedy)), refs), "sign_word_acc": 0.5}


def test_sign_word_accuracy_needs_one_sign_word_in_every_reference():
    from vlmlab.synth import scoring

    refs = {"a": ["a sign reads taxi.", "taxi is written on a sign."], "b": ["a sign reads tea.", "a red circle."]}
    assert scoring.sign_word_accuracy({"a": "the sign says taxi."}, refs, SIGN_WORDS) == 1.0
    assert scoring.sign_word_accuracy({"a": "the sign says tea."}, refs, SIGN_WORDS) == 0.0
    with pytest.raises(StageError, match="references of b"):
        scoring.sign_word_accuracy({"b": "a sign reads tea."}, refs, SIGN_WORDS)
