"""Is the image token under the sign the sign's word, as the LM embeds it? (CPU, tiny world, issue #10)

    python bench/sign_slot_alignment.py models/zoo stage1:raw stage1:enhanced models/runs/baseline \
        models/runs/blip2_full [--scenes 600] [--out bench/results/sign_slot_alignment.json]

`stage1:<set>` is models/zoo with the connector of pretrain@<set> (models/pretrain/<set>): stage 1 alone.
For held-out scenes of the label stream, the LM-input token in the slot under the sign's centre
(bench/image_token_probe.py's `lm_input_sign_slot`, which a linear probe reads the word from at 0.98-1.0
in every model) is compared, by cosine, with the LM's input embeddings: how often its nearest token
is the sign's true word, how often that word is the nearest of the sign words, and the mean cosine with
the word's embedding. A token that *is* the word's embedding is one the LM can copy into its answer;
one that only encodes the word linearly has to be decoded first.
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

from bench.image_token_probe import PROBE_SEED, sign_slots, token_views  # noqa: E402
from vlmlab.models.load import load_model  # noqa: E402
from vlmlab.sim.labels import label_stream_scenes, picture  # noqa: E402
from vlmlab.sim.vocab import SIGN_WORDS  # noqa: E402
from vlmlab.train import recipe  # noqa: E402


def load(spec: str):
    """A model folder, or `stage1:<set>`: models/zoo with pretrain@<set>'s connector."""
    if not spec.startswith("stage1:"):
        return load_model(spec)
    model, processor = load_model("models/zoo")
    recipe.load_stage1(model, Path("models/pretrain") / spec.split(":", 1)[1])
    return model, processor


@torch.no_grad()
def alignment(model, processor, scenes) -> dict[str, float]:
    size = model.config.image_size_aux
    views = token_views(model, np.stack([picture(s, size, size) for s in scenes]))
    slots = views["lm_input"].reshape(len(scenes), model.config.num_image_tokens, -1)
    at_sign = F.normalize(slots[torch.arange(len(scenes)), sign_slots(scenes, int(round(slots.shape[1] ** 0.5)))], dim=-1)
    table = F.normalize(model.get_input_embeddings().weight.detach(), dim=-1)
    ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(SIGN_WORDS)))
    true = torch.tensor([SIGN_WORDS.index(s.word) for s in scenes])
    return {"nearest_token_is_the_word": round(float(((at_sign @ table.T).argmax(-1) == ids[true]).float().mean()), 4),
            "nearest_sign_word_is_the_word": round(float(((at_sign @ table[ids].T).argmax(-1) == true).float().mean()), 4),
            "cosine_with_the_word": round(float((at_sign * table[ids[true]]).sum(-1).mean()), 4),
            "chance_nearest_sign_word": round(1 / len(SIGN_WORDS), 4)}


def main(*models: str, scenes: int = 600, out: str = "") -> None:
    drawn = list(label_stream_scenes(scenes, PROBE_SEED + 1))  # not the probe's fitting scenes
    report = {}
    for spec in models:
        report[spec] = alignment(*load(spec), drawn)
        print(spec, json.dumps(report[spec]), flush=True)
    if out:
        Path(out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
