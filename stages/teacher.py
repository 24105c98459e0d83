"""Stage `teacher`: the captioner Data-Juicer re-captions the seed set with.

    python stages/teacher.py --curated data/world/curated --eval data/world/eval/captions.jsonl \
        --out models/teacher --metrics metrics/teacher.json --monitor plots/monitor/teacher

Tiny world (synth.captioner: ""): pretrain a tiny BLIP-2's image side on labelled scenes and freeze it,
train its language side on the curated dense captions, save it as a
normal HF folder, score its held-out captions (BLEU-4, CIDEr) next to the seed's noisy alt-text.
Real runs (synth.captioner: a local folder, e.g. blip2-opt-2.7b): only check it loads as Data-Juicer
loads it, and record which folder it was in models/teacher/captioner.json.
"""
import sys
from pathlib import Path

# this checkout's vlmlab before any installed copy: a clone or a `dvc exp run --temp` copy runs its own code
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmlab.determinism import pin; pin()  # noqa: E702  first: CPU kernels bit for bit on any x86 (vlmlab/determinism.py)

import torch

import fire

from vlmlab import io
from vlmlab.monitor import Monitor
from vlmlab.params import load as load_params
from vlmlab.seeding import seed_everything
from vlmlab.sim import teacher, world
from vlmlab.sim.text import world_words
from vlmlab.sim.vocab import SIGN_WORDS
from vlmlab.synth import captioner as captioners
from vlmlab.synth import scoring

SEED_OFFSET = 50


def main(curated: str = "data/world/curated", eval: str = "data/world/eval/captions.jsonl",
         out: str = "models/teacher", metrics: str = "metrics/teacher.json",
         monitor: str = "plots/monitor/teacher", params: str = "params.yaml") -> None:
    p = load_params(params)
    tp, captioner = p["teacher"], p["synth"]["captioner"]
    seed = p["seed"] + SEED_OFFSET
    torch.set_num_threads(tp["threads"])
    with Monitor(monitor, tp["monitor_interval"]) as mon:
        if captioner:  # real run: check and record, train nothing
            model, _ = captioners.load_captioner(captioner, trust_remote_code=p["synth"]["trust_remote_code"])
            params_m = sum(x.numel() for x in model.parameters()) / 1e6
            with io.atomic_path(out) as tmp:
                tmp.mkdir()
                io.write_json(tmp / "captioner.json", {"captioner": captioner, "params_m": params_m,
                                                        "architecture": model.config.architectures[0]})
            result = {"external": 1, "params_m": params_m}
        else:
            cfg = teacher.TeacherConfig(**{k: v for k, v in tp.items() if k in teacher.TeacherConfig.__dataclass_fields__})
            images, captions, _ = captioners.read_caption_set(curated)
            seed_everything(seed)
            model, processor = teacher.build_teacher(cfg, world_words())
            encoders = teacher.pretrain_encoders(model, processor, cfg, seed, p["world"]["image_size"])
            stats = teacher.train_teacher(model, processor, images, captions, cfg, seed)
            with io.atomic_path(out) as tmp:
                teacher.save_teacher(model, processor, tmp)
            # score the saved folder as Data-Juicer will load it, not the object in memory
            model, processor = captioners.load_captioner(out)
            rows, eval_images = scoring.read_eval_captions(eval, tp["eval_limit"])
            raw = world.web_captions(rows, p["seed"], p["world"]["noise_rate"])
            seed_everything(seed)
            scores, _ = scoring.score_teacher(model, processor, rows, eval_images, raw, tp["eval_batch_size"],
                                               tp["eval_samples"], SIGN_WORDS)
            gain = scores["teacher_sampled"]["cider"] - scores["raw_captions"]["cider"]
            result = {"external": 0, "params_m": sum(x.numel() for x in model.parameters()) / 1e6,
                      "encoders": encoders, "train": {k: v for k, v in stats.items() if k != "losses"},
                      "eval_images": len(rows),
                      **scores, "cider_gain_over_raw": gain}
    io.write_metrics(metrics, {**result, "monitor": mon.peaks})
    print(f"teacher: {io.flatten(result)}")


if __name__ == "__main__":
    fire.Fire(main)
