"""Does a model read its images? Each model's benchmarks again with every image replaced by one blank image.

    python bench/blind_control.py --out bench/results/blind_control.json            # the models of params.yaml evaluate.models
    python bench/blind_control.py --models baseline,blip2_lora_merged --out /tmp/b.json

The blank image is the CLIP mean colour (what MGM's pad fills with), so both towers see a uniform
field. A metric that scores the same blind as with the images (paired bootstrap over the same items:
seeing - blind, interval containing 0) is answered from the question and the language prior alone,
and a difference between runs on it is not about what the models saw. Reads `data/eval/<model>` (the
evaluate stage's per-item results; --preds) for the seeing scores; writes nothing into the pipeline.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from vlmlab.determinism import pin  # noqa: E402

pin()
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vlmlab import io  # noqa: E402
from vlmlab.evaluate import items  # noqa: E402
from vlmlab.evaluate.benchmarks import GenConfig, run_captions, run_mmbench, run_textvqa  # noqa: E402
from vlmlab.evaluate.bootstrap import contrast  # noqa: E402
from vlmlab.models.load import load_model  # noqa: E402
from vlmlab.models.processor import CLIP_MEAN  # noqa: E402
from vlmlab.params import load as load_params  # noqa: E402


def blind(processor) -> None:
    """Every image the processor reads becomes one uniform CLIP-mean image of the same size."""
    seeing = processor.images
    fill = tuple(round(255 * c) for c in CLIP_MEAN)
    processor.images = lambda image: seeing(Image.new("RGB", (processor.image_size_aux,) * 2, fill))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="names of params.yaml evaluate.models (default: all)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preds", default="data/eval", help="the evaluate stage's per-item results, one folder per model")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    p = load_params(a.params)["evaluate"]
    cfg = GenConfig(**{k: p[k] for k in GenConfig.__dataclass_fields__ if k in p})  # the items the stage scored
    names = [n for n in a.models.split(",") if n] or list(p["models"])
    result = {"blank": "CLIP mean colour", "bootstrap_samples": p["bootstrap_samples"], "models": {}}
    for name in names:
        seen = items.load_statistics(Path(a.preds) / name)
        if seen is None:
            raise io.fail(f"{a.preds}/{name}: no per-item results; run `dvc repro evaluate@{name}` first")
        net, processor = load_model(p["models"][name])
        net.eval()
        blind(processor)
        tv_rows, _ = run_textvqa(net, processor, p["textvqa_questions"], p["textvqa_annotations"], p["textvqa_images"], cfg)
        cap_rows, _ = run_captions(net, processor, p["captions"], p["caption_images"], cfg)
        mm_rows, _ = run_mmbench(net, processor, p["mmbench"], cfg)
        unseen = items.statistics({"textvqa": tv_rows, "captions": cap_rows, "mmbench": mm_rows})
        row = {}
        for metric in items.HEADLINE:
            pair = items.align({"seeing": seen, "blind": unseen}, metric)
            ci = contrast(pair, {"seeing": 1.0, "blind": -1.0},
                          items.resample_counts_for(pair, p["bootstrap_samples"], p["bootstrap_seed"]), p["ci_level"])
            value = {k: float(s.values(np.ones((1, len(s.keys))))[0]) for k, s in pair.items()}
            row[metric] = {"seeing": value["seeing"], "blind": value["blind"],
                           "difference": ci.value, "ci_low": ci.ci_low, "ci_high": ci.ci_high,
                           "reads_images": bool(ci.ci_low > 0 or ci.ci_high < 0)}
        result["models"][name] = row
        print(name, {m: f"{r['seeing']:.3f} vs blind {r['blind']:.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
                     for m, r in row.items()}, flush=True)
    io.write_json(a.out, result)


if __name__ == "__main__":
    main()
