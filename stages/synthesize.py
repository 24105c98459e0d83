"""Stage `synthesize`: re-caption the seed set with Data-Juicer (10k seed -> 30k enhanced on the tiny world).

    python stages/synthesize.py --raw data/raw --teacher models/teacher --recipe configs/recipes/synthesize.yaml \
        --out data/enhanced --metrics metrics/synth.json --monitor plots/monitor/synthesize --work work/synth

Renders the recipe from params (synth section), runs it in-process with Data-Juicer's executor,
and writes data/enhanced in the seed layout (dj.jsonl, llava.json, rejects.jsonl, trace_sample.jsonl,
images/) plus per-op counts. The same recipe runs outside with `dj-process --config <recipe>`.
"""
import sys
from pathlib import Path

# this checkout's vlmlab before any installed copy: a clone or a `dvc exp run --temp` copy runs its own code
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmlab.determinism import pin; pin()  # noqa: E702  first: CPU kernels bit for bit on any x86 (vlmlab/determinism.py)

import os

import fire

from vlmlab import io
from vlmlab.monitor import Monitor
from vlmlab.params import load as load_params
from vlmlab.synth import recipe as recipes
from vlmlab.synth.run import synthesize

SEED_OFFSET = 60


def main(raw: str = "data/raw", teacher: str = "models/teacher", recipe: str = "configs/recipes/synthesize.yaml",
         out: str = "data/enhanced", metrics: str = "metrics/synth.json", monitor: str = "plots/monitor/synthesize",
         work: str = "work/synth", params: str = "params.yaml") -> None:
    p = load_params(params)
    cfg = recipes.SynthConfig.from_params(p["synth"])
    seed = p["seed"] + SEED_OFFSET
    captioner = cfg.captioner or teacher
    if not (Path(captioner) / "config.json").is_file():
        raise io.fail(f"captioner '{captioner}' has no config.json: run `dvc repro teacher`, or set synth.captioner "
                      "to a local BLIP-2 folder (e.g. blip2-opt-2.7b)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # Data-Juicer forks workers after tokenizing
    rendered = recipes.render_recipe(cfg, captioner=captioner, dataset_path=f"{work}/input.jsonl",
                                     export_path=f"{work}/dj/export/dj.jsonl", work_dir=f"{work}/dj")
    recipes.write_recipe(rendered, recipe, seed)
    with Monitor(monitor, cfg.monitor_interval) as mon:
        result = synthesize(Path(raw), Path(recipe), Path(out), Path(work), seed, cfg.trace_sample)
    result["seed"] = seed  # Data-Juicer takes none; this one went to torch/random/numpy before the run
    io.write_metrics(metrics, {**result, "monitor": mon.peaks})
    ops = ", ".join(f"{k} {v['in']}->{v['out']}" for k, v in result["ops"].items())
    print(f"synthesize: {result['samples_in']} seed -> {result['samples_out']} enhanced ({ops}); "
          f"{result['captions_per_s']} captions/s; {mon.peaks['wall_s']} s")


if __name__ == "__main__":
    fire.Fire(main)
