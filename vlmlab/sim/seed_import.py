"""The tiny world's seed set, written in the challenge's layout and imported by the real importer.

Apart from sim/world.py so that only `prepare` (and not the zoo or the teacher, which read the world)
depends on the importer.
"""
from __future__ import annotations

from pathlib import Path

from vlmlab.data.validate import import_seed
from vlmlab.io import fail
from vlmlab.sim.world import SEED_JSONL, SEED_PROMPTS, build_world


def simulate_and_import(seed_dir: str | Path, out_world: str | Path, out_raw: str | Path, params: dict,
                        workers: int = 2) -> tuple[dict[str, int], dict]:
    """The tiny world as `prepare` runs it: the seed set in the challenge's layout in `seed_dir`, imported
    into `out_raw` by the real importer (as `data.source: path` is), the world-only sets in `out_world`.
    Returns (world counts without "raw", the importer's stats); one line if the importer lost a sample."""
    counts = build_world(seed_dir, out_world, params)
    n = counts.pop("raw")
    raw = import_seed(seed_dir, SEED_JSONL, SEED_PROMPTS, out_raw, params["seed"], workers=workers)
    if raw["samples"] != n or raw["prompts_restored"] != n:   # the simulator broke the seed format
        raise fail(f"the tiny world wrote {n} seed samples, but the importer took {raw['samples']} "
                   f"({raw['prompts_restored']} with their stage_1.json prompt; rejects: {raw['rejects']})")
    return counts, raw
