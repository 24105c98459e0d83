"""Memory and utilisation over time, sampled in a background thread.

GPU memory/utilisation come from NVML (pynvml) when a GPU is visible; otherwise the
process tree's RSS and CPU use from psutil. One CSV (a DVC plot), one PNG and a few
peak figures (metrics) per stage.
"""
from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import psutil

from vlmlab import io

FIELDS = ["t_s", "rss_mb", "cpu_pct", "gpu_mem_mb", "gpu_util_pct"]


def _nvml_handles():
    try:
        import warnings

        with warnings.catch_warnings():  # pynvml 13 warns that it wraps nvidia-ml-py
            warnings.simplefilter("ignore", FutureWarning)
            import pynvml

        pynvml.nvmlInit()
        return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no driver, no GPU: the CPU figures are what we have
        return None, []


class Monitor:
    """Context manager: `with Monitor("plots/monitor/train_baseline", interval=0.5) as m: ...`.

    On exit writes `<prefix>.csv` and `<prefix>.png`; `m.peaks` holds the peak metrics.
    """

    def __init__(self, prefix: str | Path, interval: float = 0.5):
        self.prefix = Path(prefix)
        self.interval = float(interval)
        self.rows: list[dict] = []
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._known: dict[int, psutil.Process] = {}
        self._nvml, self._gpus = _nvml_handles()

    def _sample(self, t0: float) -> dict:
        # cpu_percent() measures since the previous call on the same Process object: keep one per
        # pid, or every child (Data-Juicer workers, dataloaders) would read 0 on each sample.
        procs = []
        for p in [self._proc] + self._proc.children(recursive=True):
            procs.append(self._known.setdefault(p.pid, p))
        rss = cpu = 0.0
        for p in procs:
            try:
                rss += p.memory_info().rss
                cpu += p.cpu_percent(None)
            except psutil.Error:  # a child ended between listing and reading
                pass
        row = {"t_s": round(time.perf_counter() - t0, 3), "rss_mb": round(rss / 2**20, 1),
               "cpu_pct": round(cpu, 1), "gpu_mem_mb": 0.0, "gpu_util_pct": 0.0}
        if self._gpus:
            mem = [self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._gpus]
            util = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._gpus]
            row["gpu_mem_mb"] = round(max(mem) / 2**20, 1)
            row["gpu_util_pct"] = float(sum(util) / len(util))
        return row

    def _loop(self, t0: float) -> None:
        while not self._stop.is_set():
            self.rows.append(self._sample(t0))
            self._stop.wait(self.interval)

    def __enter__(self) -> "Monitor":
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, args=(self._t0,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.rows.append(self._sample(self._t0))
        self.peaks = {
            "wall_s": round(time.perf_counter() - self._t0, 2),
            "peak_rss_mb": max(r["rss_mb"] for r in self.rows),
            "mean_cpu_pct": round(sum(r["cpu_pct"] for r in self.rows) / len(self.rows), 1),
        }
        if self._gpus:
            self.peaks["peak_gpu_mem_mb"] = max(r["gpu_mem_mb"] for r in self.rows)
            self.peaks["mean_gpu_util_pct"] = round(sum(r["gpu_util_pct"] for r in self.rows) / len(self.rows), 1)
            try:
                import torch

                if torch.cuda.is_available():
                    self.peaks["peak_torch_alloc_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            except ImportError:
                pass
        if exc[0] is None:  # a failed stage leaves no finished-looking plot
            self.write()

    def write(self) -> None:
        with io.atomic_path(self.prefix.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(self.rows)
        self._plot()

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = [r["t_s"] for r in self.rows]
        use_gpu = bool(self._gpus)
        fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
        key, label = ("gpu_mem_mb", "GPU memory (MiB)") if use_gpu else ("rss_mb", "RSS (MiB)")
        ax.plot(t, [r[key] for r in self.rows], color="tab:blue")
        ax.set_xlabel("seconds")
        ax.set_ylabel(label, color="tab:blue")
        ax2 = ax.twinx()
        key, label = ("gpu_util_pct", "GPU util (%)") if use_gpu else ("cpu_pct", "CPU (%)")
        ax2.plot(t, [r[key] for r in self.rows], color="tab:orange", alpha=0.6)
        ax2.set_ylabel(label, color="tab:orange")
        ax.set_title(self.prefix.name)
        fig.tight_layout()
        with io.atomic_path(self.prefix.with_suffix(".png")) as tmp:
            fig.savefig(tmp, format="png", metadata={"Software": None})
        plt.close(fig)
