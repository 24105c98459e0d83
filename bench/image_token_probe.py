"""What the LM is given to read: linear probes on a model's image tokens (CPU, tiny world, issue #10).

    python bench/image_token_probe.py models/zoo models/runs/baseline [--scenes 3000] [--out probe.json]

For held-out scenes of the label stream (rendered as the world stores them), the tokens at three
points of `get_image_features` are probed for the sign's word, the colour of the object in the left
column (or none) and the object count: the ViT's tokens, the tokens after patch-info mining, and the
projector's output (what is spliced into the LM's input). Each probe is a multinomial logistic
regression on the flattened, standardised tokens, fit on the first two thirds and scored on the rest.
Set against the model's TextVQA answers by question kind (metrics/eval/<model>.json, textvqa_by_type),
it separates "the tokens do not carry it" from "the LM does not read what the tokens carry".
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

from vlmlab.models.load import load_model  # noqa: E402
from vlmlab.models.processor import clip_normalise, low_res_view  # noqa: E402
from vlmlab.sim.labels import label_stream_scenes, picture  # noqa: E402
from vlmlab.sim.vocab import COLORS, SIGN_WORDS  # noqa: E402

PROBE_SEED = 12345  # a label-stream seed no zoo tower trains on (the zoo uses the master seed + 0..2)


def targets(scenes) -> dict[str, torch.Tensor]:
    def left_colour(scene):
        return next((1 + COLORS.index(o.color) for o in scene.objects if o.column == 0), 0)
    return {"word": torch.tensor([SIGN_WORDS.index(s.word) for s in scenes]),
            "color_left": torch.tensor([left_colour(s) for s in scenes]),
            "count": torch.tensor([s.count - 1 for s in scenes])}


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, n_fit: int, steps: int = 300) -> float:
    """Held-out accuracy of a logistic regression (Adam, small L2) on standardised features."""
    mean, std = x[:n_fit].mean(0), x[:n_fit].std(0) + 1e-5
    x = (x - mean) / std
    torch.manual_seed(0)
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
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


def main(*models: str, scenes: int = 3000, out: str = "") -> None:
    if not models:
        raise SystemExit("give one or more model folders, e.g. models/zoo models/runs/baseline")
    drawn = list(label_stream_scenes(scenes, PROBE_SEED))
    n_fit = 2 * scenes // 3
    y = targets(drawn)
    report = {}
    for folder in models:
        model, _ = load_model(folder)
        size = model.config.image_size_aux
        images = np.stack([picture(s, size, size) for s in drawn])
        views = token_views(model, images)
        report[folder] = {view: {k: probe_accuracy(x, t, n_fit) for k, t in y.items()} for view, x in views.items()}
        chance = {k: round(float((t[n_fit:] == t[:n_fit].mode().values).float().mean()), 4) for k, t in y.items()}
        report[folder]["chance"] = chance
        print(folder, json.dumps(report[folder]), flush=True)
    if out:
        Path(out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
