"""Does the tiny teacher read the sign? Greedy captions of held-out scenes, word accuracy (CPU, tiny world, issue #10).

    python bench/teacher_reading.py [--teacher models/teacher] [--variants trainable_vit,frozen_vit] [--out reading.json]

The caption-eval scenes (data/world/eval/captions.jsonl) come back from their ids (the draws `prepare`
rendered them from), so each one's sign word is known; a caption reads the sign when it names that word.
- `committed`: the `teacher` stage's model (--teacher);
- `trainable_vit` / `frozen_vit`: the teacher recipe of params.yaml retrained here, its vision tower first
  pretrained to classify the sign's word of labelled scenes (the zoo's label stream, at the teacher's
  image size), then trained on with the rest, or frozen as BLIP-2 freezes its ViT-g.
`bench/results/teacher_reading.json` holds one run's figures, from before the teacher stage adopted what
they pointed to: `teacher.pretrain_encoders` pretrains the ViT and then the Q-Former on all scene labels and
freezes both, and `metrics/teacher.json` reports `sign_word_acc` itself.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmlab.determinism import pin; pin(threads=2)  # noqa: E402,E702

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vlmlab import io  # noqa: E402
from vlmlab.seeding import seed_everything  # noqa: E402
from vlmlab.sim import teacher  # noqa: E402
from vlmlab.sim.labels import labelled_scenes  # noqa: E402
from vlmlab.sim.text import SIGN_WORDS, world_words  # noqa: E402
from vlmlab.synth import captioner as captioners  # noqa: E402
from vlmlab.synth import scoring  # noqa: E402
from vlmlab.sim.world import WorldConfig  # noqa: E402

from bench.caption_word_audit import true_word  # noqa: E402


def word_accuracy(model, processor, images, truth: list[str]) -> tuple[float, list[str]]:
    captions = captioners.caption_images(model, processor, images, 100, do_sample=False)
    right = sum(word in re.findall(r"\w+", c.lower()) for word, c in zip(truth, captions))
    return right / len(captions), captions[:3]


def pretrain_vision(model, processor, n: int, steps: int, seed: int) -> float:
    """The teacher's vision tower + a linear head on its flattened tokens, trained to name the sign's word;
    returns the word accuracy on 500 held-out scenes."""
    images, labels = labelled_scenes(n + 500, seed, model.config.vision_config.image_size)
    x = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    y = torch.from_numpy(labels["word"])
    vision = model.vision_model
    width = vision.config.hidden_size * (vision.embeddings.num_patches + 1)
    head = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, int(y.max()) + 1))
    opt = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, n, (64,), generator=g)
        loss = F.cross_entropy(head(vision(x[idx]).last_hidden_state.flatten(1)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(vision(x[n:]).last_hidden_state.flatten(1)).argmax(-1) == y[n:]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="models/teacher")
    ap.add_argument("--variants", default="trainable_vit,frozen_vit")
    ap.add_argument("--scenes", type=int, default=6000, help="labelled scenes for the vision pretraining")
    ap.add_argument("--steps", type=int, default=400, help="vision pretraining steps (batch 64)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    p = io.load_params()
    rows, images = scoring.read_eval_captions("data/world/eval/captions.jsonl", p["teacher"]["eval_limit"])
    world_seed = WorldConfig.from_params(p).seed
    truth = [true_word(world_seed, r["id"], "eval_caption") for r in rows]
    if not all(w in r["captions"][0] for w, r in zip(truth, rows)):
        raise SystemExit("teacher_reading: data/world/eval/captions.jsonl: its scenes do not come back from their ids (another world seed?)")
    result = {"eval_images": len(rows), "chance": round(1 / len(SIGN_WORDS), 4), "variants": {}}
    model, processor = captioners.load_captioner(a.teacher)
    acc, examples = word_accuracy(model, processor, images, truth)
    result["variants"]["committed"] = {"word_accuracy": acc, "examples": examples}
    print("committed", acc, flush=True)
    tp = p["teacher"]
    cfg = teacher.TeacherConfig(**{k: v for k, v in tp.items() if k in teacher.TeacherConfig.__dataclass_fields__})
    curated, captions, _ = captioners.read_caption_set("data/world/curated")
    for variant in filter(None, a.variants.split(",")):
        seed_everything(p["seed"] + 50)
        model, processor = teacher.build_teacher(cfg, world_words())
        t0 = time.perf_counter()
        vision_acc = pretrain_vision(model, processor, a.scenes, a.steps, p["seed"] + 7)
        vision_s = time.perf_counter() - t0
        if variant == "frozen_vit":
            model.vision_model.requires_grad_(False)
        stats = teacher.train_teacher(model, processor, curated, captions, cfg, p["seed"] + 50)
        acc, examples = word_accuracy(model, processor, images, truth)
        metrics, _ = scoring.score_teacher(model, processor, rows, images, None, tp["eval_batch_size"], 1)
        result["variants"][variant] = {"vision_word_accuracy": round(vision_acc, 4), "vision_pretrain_s": round(vision_s, 1),
                                       "teacher_train_s": stats["train_s"], "word_accuracy": acc,
                                       "cider_greedy": round(metrics["teacher_greedy"]["cider"], 4),
                                       "cider_sampled": round(metrics["teacher_sampled"]["cider"], 4), "examples": examples}
        print(variant, json.dumps({k: v for k, v in result["variants"][variant].items() if k != "examples"}), flush=True)
    if a.out:
        io.write_json(a.out, result)


if __name__ == "__main__":
    main()
