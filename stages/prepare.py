"""Stage `prepare`: the seed set (tiny world or a real folder) and the world-only sets.

    python stages/prepare.py --out_raw data/raw --out_world data/world --metrics metrics/data/prepare.json

data.source=world: the tiny world (params `world`, `seed`) writes its seed set as the MGM challenge
                   ships one (input/pretrain_stage_1_10k/ layout, in a temporary folder), which is
                   then imported exactly as a real folder is: the default run exercises the importer.
data.source=path:  data/raw is imported from data.path (validated, rejects counted).
Either way the curated, instruction and eval sets in data/world come from the tiny world.
"""
import sys
from pathlib import Path

# this checkout's vlmlab before any installed copy: a clone or a `dvc exp run --temp` copy runs its own code
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmlab.determinism import pin; pin()  # noqa: E702  first: CPU kernels bit for bit on any x86 (vlmlab/determinism.py)

import tempfile
import time

import fire

from vlmlab.data.validate import import_seed
from vlmlab.io import atomic_path, fail, write_metrics
from vlmlab.params import load as load_params
from vlmlab.sim.seed_import import simulate_and_import
from vlmlab.sim.world import build_world


def main(out_raw: str = "data/raw", out_world: str = "data/world", metrics: str = "metrics/data/prepare.json",
         params: str = "params.yaml") -> None:
    p = load_params(params)
    source = p["data"]["source"]
    if source not in ("world", "path"):
        raise fail(f"params.yaml data.source is '{source}'; use 'world' (tiny world) or 'path' (a real folder)")
    start = time.perf_counter()
    # both folders appear together or not at all: nothing half-written survives a crash
    with atomic_path(out_raw) as raw_tmp, atomic_path(out_world) as world_tmp:
        if source == "world":
            # beside data/raw (same filesystem: the importer hard-links the images), gone afterwards
            with tempfile.TemporaryDirectory(prefix=".seed.", dir=raw_tmp.parent) as seed:
                counts, raw = simulate_and_import(seed, world_tmp, raw_tmp, p)
        else:
            d = p["data"]
            raw = import_seed(d["path"], d["jsonl"], d["stage1_json"], raw_tmp, p["seed"])
            counts = build_world(None, world_tmp, p)
    write_metrics(metrics, {"raw": raw, "world": counts})
    print(f"prepare: {raw['samples']} raw samples ({raw['rejects']['total']} rejected), world sets {counts}, "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    fire.Fire(main)
