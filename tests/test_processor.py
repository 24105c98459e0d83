"""MgmProcessor: chat template, image expansion, labels, both views, padding, save/load."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.models.processor import IGNORE_INDEX, MgmProcessor
from vlmlab.sim.lm_tokenizer import train_world_tokenizer

TEXTS = ["a small red circle on the left .", "what does the sign say ?", "the sign says hello .", "two"]


@pytest.fixture(scope="module")
def processor():
    return MgmProcessor(train_world_tokenizer(TEXTS), image_size=32, image_size_aux=96, num_image_tokens=16)


def test_conversation_labels_answers_and_round_ends(processor):
    conv = [{"from": "human", "value": "<image>\nwhat does the sign say ?"}, {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "how many ?"}, {"from": "gpt", "value": "two ."}]
    enc = processor.encode_conversation(conv, Image.new("RGB", (96, 96), "red"))
    ids, labels = enc["input_ids"].tolist(), enc["labels"].tolist()
    assert ids.count(processor.image_token_id) == 16
    assert ids[0] == processor.tokenizer.bos_token_id
    learned = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    # MGM's gemma template: every round ends "<end_of_turn>\n<eos>", all of it learned
    assert processor.tokenizer.convert_ids_to_tokens(learned) == ["hello", "<end_of_turn>", "\n", "<eos>",
                                                                  "two", ".", "<end_of_turn>", "\n", "<eos>"]
    assert all(l in (t, IGNORE_INDEX) for t, l in zip(ids, labels))
    text = processor.tokenizer.decode(ids)
    assert text.count("<start_of_turn> user") == 2 and text.count("<start_of_turn> model") == 2
    assert enc["pixel_values"].shape == (3, 32, 32) and enc["pixel_values_aux"].shape == (3, 96, 96)


def test_missing_placeholder_is_added_and_extra_ones_refused(processor):
    image = Image.new("RGB", (50, 40), "blue")
    enc = processor.encode_conversation([{"from": "human", "value": "what ?"}, {"from": "gpt", "value": "two"}], image)
    assert enc["input_ids"].tolist().count(processor.image_token_id) == 16
    # as MGM's preprocess_multimodal: a placeholder anywhere in the question moves to its front
    late = processor.encode_conversation([{"from": "human", "value": " what ? <image>"}, {"from": "gpt", "value": "two"}], image)
    assert torch.equal(late["input_ids"], processor.encode_conversation(
        [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "two"}], image)["input_ids"])
    with pytest.raises(ValueError, match="alternate"):
        processor.encode_conversation([{"from": "human", "value": "<image>\nwhat ?"}], image)
    with pytest.raises(ValueError, match="2 <image> tokens"):
        processor.encode_conversation([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}], image)
    with pytest.raises(ValueError, match="unknown speaker"):
        processor.encode_conversation([{"from": "robot", "value": "<image>"}], image)


def test_prompt_ends_where_the_answer_starts(processor):
    enc = processor.encode_prompt("what does the sign say ?", Image.new("RGB", (96, 96)))
    tokens = processor.tokenizer.convert_ids_to_tokens(enc["input_ids"].tolist()[-5:])
    assert tokens == ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
    assert "labels" not in enc


def test_views_pad_or_crop_and_low_res_comes_from_the_normalised_high_res(processor):
    image = Image.new("RGB", (192, 96), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 48, 96))  # black strip on the left
    white = (1.0 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    mean_colour = (torch.tensor([int(m * 255) for m in processor.image_mean]) / 255 - torch.tensor(processor.image_mean)) \
        / torch.tensor(processor.image_std)
    padded = processor.images(image)["pixel_values_aux"]  # pad: 192 x 192 canvas, image in rows 48..143
    assert torch.allclose(padded[:, :20].amin((1, 2)), mean_colour, atol=1e-5)
    assert torch.allclose(padded[:, :20].amax((1, 2)), mean_colour, atol=1e-5)
    assert padded[:, 48:].amin() < -1.5  # the black strip survives
    crop = MgmProcessor(processor.tokenizer, 32, 96, 16, image_aspect_ratio="square")
    views = crop.images(image)
    assert torch.allclose(views["pixel_values_aux"].amin((1, 2)), white, atol=1e-5)  # strip cropped away
    assert views["pixel_values"].shape == (3, 32, 32)
    # 96 -> 32 bilinear without antialias samples the centre pixel of every 3 x 3 block
    assert torch.equal(views["pixel_values"], views["pixel_values_aux"][:, 1::3, 1::3])
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        MgmProcessor(processor.tokenizer, 32, 96, 16, image_aspect_ratio="anyres")


def test_pad_left_and_right(processor):
    a = processor.encode_prompt("two", Image.new("RGB", (96, 96)))
    b = processor.encode_prompt("what does the sign say ?", Image.new("RGB", (96, 96)))
    left = processor.pad([a, b], "left")
    n = len(b["input_ids"]) - len(a["input_ids"])
    assert left["attention_mask"][0].tolist() == [0] * n + [1] * len(a["input_ids"])
    assert torch.equal(left["input_ids"][0, n:], a["input_ids"])
    right = processor.pad([dict(a, labels=a["input_ids"]), dict(b, labels=b["input_ids"])], "right")
    assert right["labels"][0, -n:].tolist() == [IGNORE_INDEX] * n
    assert left["pixel_values_aux"].shape == (2, 3, 96, 96)


def test_save_load_roundtrip_and_decode(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    again = MgmProcessor.from_pretrained(tmp_path)
    conv = [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "the sign says hello ."}]
    image = Image.new("RGB", (96, 96), "green")
    x, y = processor.encode_conversation(conv, image), again.encode_conversation(conv, image)
    assert all(torch.equal(x[k], y[k]) for k in x)
    answer = [t for t, l in zip(y["input_ids"].tolist(), y["labels"].tolist()) if l != IGNORE_INDEX]
    assert again.batch_decode([answer]) == ["the sign says hello."]
    assert again.image_aspect_ratio == processor.image_aspect_ratio == "pad"
    with pytest.raises(FileNotFoundError, match="no processor here"):
        MgmProcessor.from_pretrained(tmp_path / "nowhere")


def test_world_tokenizer_has_gemma_s_layout():
    tok = train_world_tokenizer(TEXTS)
    assert [tok.convert_ids_to_tokens(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert {"<start_of_turn>", "<end_of_turn>"} <= set(tok.all_special_tokens)
    assert "<image>" not in tok.get_vocab()  # as gemma-2b-it: the processor appends it
    ids = tok("<start_of_turn>user\ntwo<end_of_turn>\n").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "<start_of_turn>", "user", "\n", "two", "<end_of_turn>", "\n"]


def test_aspect_ratio_follows_the_model_config_beside_it(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "mgm", "image_aspect_ratio": "square"}')
    assert MgmProcessor.from_pretrained(tmp_path).image_aspect_ratio == "square"


def test_blind_control_gives_every_image_the_same_blank_views(processor):
    from vlmlab.evaluate.blind import blank_images
    from vlmlab.models.processor import CLIP_MEAN

    rng = np.random.default_rng(0)
    a, b = (Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)) for _ in range(2))
    assert not torch.equal(processor.images(a)["pixel_values_aux"], processor.images(b)["pixel_values_aux"])
    blind = copy.deepcopy(processor)
    blank_images(blind)
    va, vb = blind.images(a), blind.images(b)
    for k in ("pixel_values", "pixel_values_aux"):
        assert torch.equal(va[k], vb[k]) and va[k].shape == processor.images(a)[k].shape
    # CLIP-normalised CLIP-mean is ~0 everywhere (8-bit rounding of the mean colour aside)
    assert va["pixel_values_aux"].abs().max() < 0.01, CLIP_MEAN
