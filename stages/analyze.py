"""Stage `analyze@<dataset>`: EDA of a caption set (data/raw, data/enhanced).

    python stages/analyze.py --data data/raw --name raw --metrics metrics/data/raw.json --plots plots/data/raw

Writes flat metrics (counts, rejects by reason, caption lengths, vocabulary, duplicates,
image sizes), CSVs that dvc.yaml declares as plots, and an overview PNG.
"""
import sys
from pathlib import Path

# this checkout's vlmlab before any installed copy: a clone or a `dvc exp run --temp` copy runs its own code
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmlab.determinism import pin; pin()  # noqa: E702  first: CPU kernels bit for bit on any x86 (vlmlab/determinism.py)

import csv

import fire

from vlmlab.data.eda import COLUMNS, analyze, plot_overview
from vlmlab.io import atomic_path, write_metrics
from vlmlab.params import load as load_params


def write_csv(path, rows: list[dict], columns) -> None:
    """Header `columns`, then one line per row: an empty table is its header alone."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main(data: str, name: str, metrics: str, plots: str, params: str = "params.yaml") -> None:
    cfg = load_params(params)["analyze"]
    result = analyze(data, top_words=cfg["top_words"], char_bin=cfg["char_bin"])
    with atomic_path(plots) as out:   # the plots folder appears complete or not at all
        out.mkdir()
        for table, rows in result.tables.items():
            write_csv(out / f"{table}.csv", rows, COLUMNS[table])
        plot_overview(result, name, out / "overview.png")
    flat = write_metrics(metrics, result.metrics)
    print(f"analyze@{name}: {flat['samples']} samples, vocabulary {flat['vocab_size']}, "
          f"{flat['duplicate_captions']} duplicate captions, {flat['images.duplicate_content']} duplicate images")


if __name__ == "__main__":
    fire.Fire(main)
