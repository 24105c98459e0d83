"""Stage `merge@<run>`: fold a LoRA run's adapter into its base and check it computes the same.

    python stages/merge.py --adapter models/runs/blip2_lora --out models/merged/blip2_lora \
        --held_out data/world/eval/captions.jsonl --metrics metrics/merge/blip2_lora.json

The fold is done in fp32 and saved in the training dtype (bf16 on CUDA, fp32 on CPU) as a
plain HF folder (no peft needed to load it), with the processor beside it. The stage fails,
leaving no output, if max |logit diff| on held-out samples between the adapter and the fp32
fold exceeds merge.tolerance, or between the adapter and the reloaded bf16 folder exceeds
merge.saved_tolerance.
"""
import sys
from pathlib import Path

# this checkout's vlmlab before any installed copy: a clone or a `dvc exp run --temp` copy runs its own code
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmlab.determinism import pin; pin()  # noqa: E402,E702  first: CPU kernels bit for bit on any x86 (vlmlab/determinism.py)

import fire  # noqa: E402

from vlmlab import io
from vlmlab.models.load import training_dtype
from vlmlab.models.processor import MgmProcessor
from vlmlab.monitor import Monitor
from vlmlab.params import load as load_params
from vlmlab.seeding import seed_everything
from vlmlab.train import merge

SEED_OFFSET = 500


def main(adapter: str, out: str, held_out: str = "data/world/eval/captions.jsonl", metrics: str = "",
         monitor: str = "", base: str = "", params: str = "params.yaml") -> None:
    p = load_params(params)
    m = p["merge"]
    seed_everything(p["seed"] + SEED_OFFSET)
    processor = MgmProcessor.from_pretrained(adapter)
    batches = merge.held_out_batches(held_out, processor, int(m["samples"]), int(m["batch_size"]))
    name = Path(out).name  # the run's name: models/merged/<run>
    with Monitor(monitor or f"plots/monitor/merge_{name}", 0.5) as mon:
        figures = merge.merge_and_check(adapter, out, batches, float(m["tolerance"]),
                                        save_dtype=training_dtype(), processor=processor,
                                        base_dir=base or None, saved_tolerance=float(m["saved_tolerance"]))
    io.write_metrics(metrics or f"metrics/merge/{name}.json",
                     {**figures, "monitor": mon.peaks})
    print(f"merge: {adapter} -> {out}, max |logit diff| {figures['max_logit_diff']:.2e} "
          f"(tolerance {figures['tolerance']:g}) over {figures['positions']} positions")


if __name__ == "__main__":
    fire.Fire(main)
