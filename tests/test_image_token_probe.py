"""bench/image_token_probe.py: its probe finds a label the features carry and not one they don't; its
planted-word check passes an LM that copies the planted word and fails one that ignores its image slots."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

spec = importlib.util.spec_from_file_location("image_token_probe", Path(__file__).parents[1] / "bench/image_token_probe.py")
probe = importlib.util.module_from_spec(spec)
_threads = torch.get_num_threads()
spec.loader.exec_module(probe)      # its pin() sets 2 threads: give the rest of the session back its own
torch.set_num_threads(_threads)


def test_the_probe_reads_a_carried_label_and_not_an_absent_one():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (600,), generator=g)
    noise = torch.randn(600, 32, generator=g)
    carried = noise.clone()
    carried[:, :4] += 3.0 * torch.nn.functional.one_hot(y, 4)    # the label, linearly, in 4 of 32 features
    assert probe.probe_accuracy(carried, y, n_fit=400) > 0.95
    assert probe.probe_accuracy(noise, y, n_fit=400) < 0.40        # chance is 0.25


class _Tokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [{"gym": 3, "bank": 5, "sign": 6}[w] for w in text.split()]}


class _Processor:
    tokenizer = _Tokenizer()

    def prompt_ids(self, question, with_image=False):
        return torch.tensor([1, 9, 9, 9, 2])   # 9: the image placeholder


class _Model(torch.nn.Module):
    """An MGM-shaped stand-in: 3 image slots; at every position its LM's logits are the embedding table's
    rows matched against the sum of its inputs (`reads`) or against nothing (an LM blind to its slots)."""

    def __init__(self, reads: bool):
        super().__init__()
        self.embedding = torch.nn.Embedding(8, 8)
        torch.nn.init.eye_(self.embedding.weight)
        self.config = type("C", (), {"num_image_tokens": 3})()
        self.reads = reads
        self.language_model = lambda inputs_embeds: type("O", (), {"logits": self._logits(inputs_embeds)})()

    def get_input_embeddings(self):
        return self.embedding

    def embed_inputs(self, ids, features):
        return features

    def _logits(self, x):  # (B, T, 8): every position sees the sum of the inputs
        seen = x.sum(1, keepdim=True) if self.reads else torch.zeros_like(x[:, :1])
        return (seen @ self.embedding.weight.T).expand(-1, x.shape[1], -1) + torch.arange(8.0) * 1e-3  # ties: last row


def test_the_planted_word_check_tells_a_reading_lm_from_a_blind_one():
    scenes = [type("S", (), {"word": w})() for w in ("gym", "bank", "gym")]
    assert probe.planted_word(_Model(reads=True), _Processor(), scenes, slot=1) == 1.0
    assert probe.planted_word(_Model(reads=False), _Processor(), scenes, slot=1) == 0.0


def test_planted_caption_nll_rewards_the_right_word_and_punishes_a_wrong_one():
    scenes = [type("S", (), {"word": w})() for w in ("gym", "bank")]
    got = probe.planted_caption_nll(_Model(reads=True), _Processor(), scenes, ["gym sign", "sign"], slot=1)
    assert got["word"]["names_word"] < got["zeros"]["names_word"] < got["other_word"]["names_word"]
    assert got["zeros"]["n_names_word"] == 1 and got["zeros"]["n_no_word"] == 1
    blind = probe.planted_caption_nll(_Model(reads=False), _Processor(), scenes, ["gym sign", "sign"], slot=1)
    assert blind["word"] == blind["zeros"] == blind["other_word"]


def test_sign_slot_is_the_patch_under_the_rendered_sign():
    """The slot the sign probe reads (4 x 4 patches, row-major) lies in the row of the sign's rendered text and
    holds more of it than any other patch in every scene, 93 % on average: the world centres the sign on one
    image token (vlmlab/sim/scene.py); the longest words (33 px at 96 px) spill a few px into the next ones."""
    from dataclasses import replace

    from vlmlab.sim.labels import label_stream_scenes
    from vlmlab.sim.scene import render

    scenes = list(label_stream_scenes(100, 7))
    shares = []
    for scene, slot in zip(scenes, probe.sign_slots(scenes, 4).tolist()):
        ink = np.argwhere((np.asarray(render(replace(scene, objects=()), 96)) < 40).all(-1)) // 24  # text: (15, 15, 15)
        assert (ink[:, 0] == slot // 4).all()
        assert np.bincount(ink[:, 1], minlength=4).argmax() == slot % 4, (scene, slot)
        shares.append(float((ink[:, 1] == slot % 4).mean()))
    assert np.mean(shares) > 0.9
    assert {s.sign_side for s in scenes} == {"top", "bottom"} and len({s.sign_x for s in scenes}) == 2
