"""Stage `zoo`: the base MGM every run starts from, saved with its processor.

    python stages/zoo.py --out models/zoo --metrics metrics/zoo.json --monitor plots/monitor/zoo

zoo.source=tiny:  a word-level tokenizer, the LM, the ViT and the ConvNeXt are pretrained on
                  tiny-world text and scene labels (vlmlab/sim/pretrain.py), assembled, written as an
                  official MGM checkpoint (sim/mgm_checkpoint.py, in a temporary folder) and converted
                  from it exactly as zoo.local_mgm is: the default run exercises the converter.
zoo.source=local: local checkpoints (an official MGM folder, or Gemma + CLIP + ConvNeXt) are
                  checked, converted and assembled; nothing is downloaded.
zoo.source=random: model.preset at random init with the world's tokenizer (mgm-2b: the real shapes),
                  for GPU speed and memory runs of the train stage on the tiny world's data.
"""
import sys
from pathlib import Path

# this checkout's vlmlab before any installed copy: a clone or a `dvc exp run --temp` copy runs its own code
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmlab.determinism import pin; pin()  # noqa: E702  first: CPU kernels bit for bit on any x86 (vlmlab/determinism.py)

import tempfile
import time

import fire
import torch

from vlmlab.io import atomic_path, fail, write_metrics
from vlmlab.models import local
from vlmlab.monitor import Monitor
from vlmlab.params import load as load_params
from vlmlab.seeding import seed_everything
from vlmlab.sim import pretrain
from vlmlab.sim.mgm_checkpoint import write_official_mgm

SEED_OFFSET = 300  # the zoo's RNG streams, apart from other stages'


def main(out: str = "models/zoo", metrics: str = "metrics/zoo.json", monitor: str = "plots/monitor/zoo",
         params: str = "params.yaml") -> None:
    p = load_params(params)
    z, m = p["zoo"], p["model"]
    seed = int(p["seed"]) + SEED_OFFSET
    seed_everything(seed)
    torch.set_num_threads(int(z["threads"]))
    start = time.perf_counter()
    with Monitor(monitor, z["monitor_interval"]) as mon:
        if z["source"] == "tiny":
            if m["preset"] != "tiny":
                raise fail(f"zoo.source=tiny builds the tiny preset, but model.preset is {m['preset']!r}")
            model, tokenizer, result = pretrain.build_tiny(z, m["preset"], m["attn_implementation"], seed,
                                                      high_res=p["world"]["image_size"])
            with tempfile.TemporaryDirectory(prefix="vlmlab-zoo-mgm.") as ckpt:   # gone afterwards, crash or not
                folder = write_official_mgm(model, tokenizer, ckpt)
                model, processor, converted = local.build_local({"local_mgm": str(folder)}, m["attn_implementation"])
            result.update(converted)   # the same parameter counts, and what the converter loaded
        elif z["source"] == "local":
            model, processor, result = local.build_local(z, m["attn_implementation"])
        elif z["source"] == "random":
            model, processor, result = pretrain.build_random(z, m["preset"], m["attn_implementation"], seed)
        else:
            raise fail(f"params.yaml zoo.source is {z['source']!r}; use 'tiny', 'local' or 'random'")
        with atomic_path(out) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    result["monitor"] = mon.peaks
    write_metrics(metrics, result)
    summary = {k: v for k, v in result.get("lm", {}).items() if "ppl" in k}
    summary.update({f"{tower}_{k}": v for tower in ("vit", "convnext")
                    for k, v in result.get(tower, {}).items() if k in ("acc_word", "chance_word")})
    print(f"zoo: {result['params']['total']:,} parameters -> {out} {summary}, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    fire.Fire(main)
