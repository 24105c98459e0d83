import csv
import subprocess
import sys

import psutil
import pytest

from vlmlab.monitor import Monitor


def test_counts_children_and_writes_plot(tmp_path):
    own_mb = psutil.Process().memory_info().rss / 2**20
    # the child holds 200 MiB of written (resident) bytes while it keeps a core busy
    child = "b = b'x' * (200 * 2**20)\nx = 0\nfor i in range(6_000_000): x += i"
    with Monitor(tmp_path / "stage", interval=0.1) as m:
        subprocess.run([sys.executable, "-c", child], check=True)
    rows = list(csv.DictReader(open(tmp_path / "stage.csv")))
    assert len(rows) >= 3 and set(rows[0]) == {"t_s", "rss_mb", "cpu_pct", "gpu_mem_mb", "gpu_util_pct"}
    assert m.peaks["mean_cpu_pct"] > 20, m.peaks   # the busy child is counted, not just this process
    assert m.peaks["peak_rss_mb"] > own_mb + 150, (own_mb, m.peaks)  # and so is the child's memory
    assert (tmp_path / "stage.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_stage_leaves_no_plot(tmp_path):
    with pytest.raises(RuntimeError):
        with Monitor(tmp_path / "stage", interval=0.1):
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())
