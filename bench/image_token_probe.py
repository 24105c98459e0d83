"""What the LM is given to read: linear probes on a model's image tokens (CPU, tiny world, issue #10).

    python bench/image_token_probe.py models/zoo models/runs/baseline [--scenes 3000] [--out probe.json]
        [--captions data/raw/llava.json]

For held-out scenes of the label stream (rendered as the world stores them), the tokens at three
points of `get_image_features` are probed for the sign's word, the colour of the object in the left
column (or none) and the object count: the ViT's tokens, the tokens after patch-info mining, and the
projector's output (what is spliced into the LM's input), and the best single slot of that output
(`lm_input_best_slot`: the projector maps each token on its own, so a word the LM is to copy must sit in
one slot), and the slot under the sign's centre in each scene (`lm_input_sign_slot`: the sign moves, top
or bottom, left or right of the middle, so a fixed slot understates what the token at the sign carries). Each probe is a
multinomial logistic regression on the flattened, standardised tokens, fit on the first two thirds and scored on the rest.
Set against the model's TextVQA answers by question kind (metrics/eval/<model>.json, textvqa_by_type),
it separates "the tokens do not carry it" from "the LM does not read what the tokens carry".

Checks of the reading itself, per model:
- planted_word: the sign's word's own LM embedding in one image slot, zeros in the other 15, and the
  TextVQA question "what word is on the sign?": the share of scenes whose greedy answer is that word (can
  the LM read a word from an image slot at all?);
- planted_caption_nll: the frozen LM's loss on noise-free web captions of 600 scenes (a stage-1 caption
  prompt before each) with zeros in the image slots, the sign's word in one, or another scene's word there,
  split by whether the caption names the word (what a word-like image token gains and costs in stage 1);
- nearest: the LM vocabulary token nearest (cosine) to each image token of the first scenes;
- with --captions (a LLaVA json, e.g. data/raw/llava.json): the model's loss on its first 1,024 captions
  with their own images and with each batch's images shifted by one (does the model use its images?).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmlab.determinism import pin; pin(threads=2)  # noqa: E702  before numpy/torch do their work

import json  # noqa: E402

import fire  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vlmlab.data.collate import ConversationDataset, PadCollator  # noqa: E402
from vlmlab.data.formats import CAPTION_PROMPTS  # noqa: E402
from vlmlab.evaluate.textvqa import PROMPT_SUFFIX  # noqa: E402
from vlmlab.models.load import load_model  # noqa: E402
from vlmlab.models.processor import clip_normalise, low_res_view  # noqa: E402
from vlmlab.sim.labels import label_stream_scenes, picture  # noqa: E402
from vlmlab.sim.text import web_caption  # noqa: E402
from vlmlab.sim.vocab import COLORS, SIGN_WORDS  # noqa: E402

PROBE_SEED = 12345  # a label-stream seed no zoo tower trains on (the zoo uses the master seed + 0..2)


def targets(scenes) -> dict[str, torch.Tensor]:
    def left_colour(scene):
        return next((1 + COLORS.index(o.color) for o in scene.objects if o.column == 0), 0)
    return {"word": torch.tensor([SIGN_WORDS.index(s.word) for s in scenes]),
            "color_left": torch.tensor([left_colour(s) for s in scenes]),
            "count": torch.tensor([s.count - 1 for s in scenes])}


def sign_slots(scenes, grid: int) -> torch.Tensor:
    """Index of the image token (a grid x grid patch grid, row-major) under each scene's sign centre."""
    cells = [(min(grid - 1, int(y * grid)), min(grid - 1, int(x * grid))) for x, y in (s.sign_centre for s in scenes)]
    return torch.tensor([r * grid + c for r, c in cells])


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, n_fit: int, steps: int = 300) -> float:
    """Held-out accuracy of a logistic regression (Adam, small L2) on standardised features."""
    mean, std = x[:n_fit].mean(0), x[:n_fit].std(0) + 1e-5
    x = (x - mean) / std
    torch.manual_seed(0)
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2, fused=True)  # fused: no MKL VML sqrt (vlmlab/determinism.py)
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(x[:n_fit] @ w + b, y[:n_fit]) + 1e-3 * w.square().sum()).backward()
        opt.step()
    with torch.no_grad():
        return round(float(((x[n_fit:] @ w + b).argmax(1) == y[n_fit:]).float().mean()), 4)


@torch.no_grad()
def token_views(model, images: np.ndarray) -> dict[str, torch.Tensor]:
    """The three points of get_image_features, each flattened to (n, N * C)."""
    high = clip_normalise(images)
    vit = model.encode_low_res(low_res_view(high, model.config.image_size))
    mined = vit + model.mine_patches(vit, model.encode_high_res(high))
    return {"vit": vit.flatten(1), "mined": mined.flatten(1), "lm_input": model.mm_projector(mined).flatten(1)}


@torch.no_grad()
def planted_word(model, processor, scenes, slot: int = 7) -> float:
    """Share of scenes answered with the sign's word when its embedding alone fills image slot `slot`."""
    prompt = processor.prompt_ids(f"what word is on the sign?\n{PROMPT_SUFFIX}", with_image=True)[None]
    hits = 0
    for scene in scenes:
        features, word = planted(model, processor, scene.word, slot)
        logits = model.language_model(inputs_embeds=model.embed_inputs(prompt, features)).logits
        hits += int(logits[0, -1].argmax()) == word
    return round(hits / len(scenes), 4)


def planted(model, processor, word: str | None, slot: int) -> tuple[torch.Tensor, int | None]:
    """(1, N, D) image features: zeros, with `word`'s own LM embedding in slot `slot`; and the word's id."""
    table = model.get_input_embeddings().weight
    features = torch.zeros(1, model.config.num_image_tokens, table.shape[1])
    if word is None:
        return features, None
    word_id = processor.tokenizer(word, add_special_tokens=False)["input_ids"][0]
    features[0, slot] = table[word_id]
    return features, word_id


@torch.no_grad()
def planted_caption_nll(model, processor, scenes, captions: list[str], slot: int = 7) -> dict[str, dict[str, float]]:
    """The frozen LM's summed loss on each scene's caption (a stage-1 caption prompt before it) with zeros in every
    image slot, with the sign's word's embedding in slot `slot`, and with another scene's word there; split
    by whether the caption names the word. Does a word-like image token pay on the caption objective, and
    what does a wrong one cost? (A right word lowers the loss of captions naming it; if it raised the others'
    more, stage 1 would have a reason to keep its tokens inert.)"""
    sums: dict[str, dict[str, list[float]]] = {}
    for i, (scene, caption) in enumerate(zip(scenes, captions)):
        prompt = processor.prompt_ids(CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)], with_image=True)
        cap = torch.tensor(processor.tokenizer(caption, add_special_tokens=False)["input_ids"])
        ids = torch.cat([prompt, cap])[None]
        group = "names_word" if scene.word in caption.split() else "no_word"
        for context, word in (("zeros", None), ("word", scene.word), ("other_word", scenes[(i + 1) % len(scenes)].word)):
            features, _ = planted(model, processor, word, slot)
            logits = model.language_model(inputs_embeds=model.embed_inputs(ids, features)).logits[0, -len(cap) - 1:-1]
            nll = -F.log_softmax(logits, -1)[torch.arange(len(cap)), cap].sum()
            sums.setdefault(context, {}).setdefault(group, []).append(float(nll))
    return {c: {g: round(float(np.mean(v)), 3) for g, v in groups.items()} | {"n_" + g: len(v) for g, v in groups.items()}
            for c, groups in sums.items()}


def nearest_tokens(model, processor, lm_input: torch.Tensor, n: int = 3) -> list[str]:
    """Per scene (the first n), the vocabulary token nearest to each of its image tokens."""
    table = F.normalize(model.get_input_embeddings().weight.detach(), dim=-1)
    tokens = lm_input[:n].view(n, model.config.num_image_tokens, -1)
    nearest = (F.normalize(tokens, dim=-1) @ table.T).argmax(-1)
    return [" ".join(processor.tokenizer.convert_ids_to_tokens(row.tolist())) for row in nearest]


@torch.no_grad()
def shuffled_image_loss(model, processor, captions: str, n: int = 1024, batch: int = 64) -> dict[str, float]:
    """Mean loss on the first n records of `captions`, with their own images and with each batch's images
    shifted by one row."""
    data = ConversationDataset(captions, processor)
    collate = PadCollator(processor.tokenizer.pad_token_id)
    own = shifted = 0.0
    batches = range(0, min(n, len(data)) // batch * batch, batch)
    for start in batches:
        rows = collate([data[i] for i in range(start, start + batch)])
        own += float(model(**rows).loss)
        for key in ("pixel_values", "pixel_values_aux"):
            rows[key] = rows[key].roll(1, dims=0)
        shifted += float(model(**rows).loss)
    return {"own_images": round(own / len(batches), 4), "shifted_images": round(shifted / len(batches), 4)}


def main(*models: str, scenes: int = 3000, out: str = "", captions: str = "") -> None:
    if not models:
        raise SystemExit("give one or more model folders, e.g. models/zoo models/runs/baseline")
    drawn = list(label_stream_scenes(scenes, PROBE_SEED))
    n_fit = 2 * scenes // 3
    y = targets(drawn)
    chance = {k: round(float((t[n_fit:] == t[:n_fit].mode().values).float().mean()), 4) for k, t in y.items()}
    report = {}
    for folder in models:
        model, processor = load_model(folder)
        size = model.config.image_size_aux
        views = token_views(model, np.stack([picture(s, size, size) for s in drawn]))
        got = {view: {k: probe_accuracy(x, t, n_fit) for k, t in y.items()} for view, x in views.items()}
        # the projector maps each token on its own: what the best single LM-input slot carries
        slots = views["lm_input"].reshape(len(drawn), model.config.num_image_tokens, -1)
        got["lm_input_best_slot"] = {k: max(probe_accuracy(slots[:, i], t, n_fit) for i in range(slots.shape[1]))
                                     for k, t in y.items()}
        # the sign moves (top or bottom, any x): the slot under its centre, scene by scene
        at_sign = slots[torch.arange(len(drawn)), sign_slots(drawn, int(round(slots.shape[1] ** 0.5)))]
        got["lm_input_sign_slot"] = {"word": probe_accuracy(at_sign, y["word"], n_fit)}
        rng = np.random.default_rng(PROBE_SEED)
        got.update(chance=chance, planted_word=planted_word(model, processor, drawn[:200]),
                   planted_caption_nll=planted_caption_nll(model, processor, drawn[:600],
                                                           [web_caption(s, rng, 0.0) for s in drawn[:600]]),
                   nearest=nearest_tokens(model, processor, views["lm_input"]))
        if captions:
            got["caption_loss"] = shuffled_image_loss(model, processor, captions)
        report[folder] = got
        print(folder, json.dumps(got), flush=True)
    if out:
        Path(out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
