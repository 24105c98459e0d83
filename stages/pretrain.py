"""Stage `pretrain@<data>`: MGM's stage 1 on one caption set, once for every run that trains on it.

    python stages/pretrain.py --data raw --base models/zoo --captions data/raw/llava.json \
        --out models/pretrain/raw --metrics metrics/pretrain/raw.json --plots plots/pretrain/raw \
        --memory plots/monitor/pretrain_raw --work work/pretrain/raw

The connector (projector + patch-info mining) learns on the captions with the towers and the LM
frozen (params `train.stage1_*`); `train@<run>` starts stage 2 from it. As in MGM's scripts, where
the full and the LoRA fine-tunes both load one pretrain's mm_projector: stage 1 depends on the data
alone, so two runs on one set would train the same connector twice. Re-run after an interruption,
it resumes from the last checkpoint in --work.
"""
import sys
from pathlib import Path

# this checkout's vlmlab before any installed copy: a clone or a `dvc exp run --temp` copy runs its own code
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in stages/train.py: sleeping idle threads
from vlmlab.determinism import pin; pin(threads=2)  # noqa: E402,E702  CPU kernels bit for bit on any x86; 2 threads as train

import contextlib  # noqa: E402
import shutil  # noqa: E402

import fire  # noqa: E402
from dvclive import Live  # noqa: E402

from vlmlab import io  # noqa: E402
from vlmlab.data.collate import ConversationDataset  # noqa: E402
from vlmlab.determinism import relax_cuda  # noqa: E402
from vlmlab.monitor import Monitor  # noqa: E402
from vlmlab.params import load as load_params  # noqa: E402
from vlmlab.train import recipe  # noqa: E402


def main(data: str, base: str = "models/zoo", captions: str = "", out: str = "", metrics: str = "", plots: str = "",
         memory: str = "", work: str = "", params: str = "params.yaml", local_rank: int = -1) -> None:
    # local_rank: passed by the `deepspeed` launcher; the Trainer reads LOCAL_RANK from the environment
    p = load_params(params)
    if not p["train"]["cuda_deterministic"]:
        relax_cuda()  # CUDA hosts: the fast kernels (a CPU run stays pinned, bit for bit)
    cfg = recipe.TrainConfig.from_params(p["train"], None, seed=p["seed"] + recipe.SEED_OFFSET)
    captions = captions or f"data/{data}/llava.json"
    out, metrics = Path(out or f"models/pretrain/{data}"), metrics or f"metrics/pretrain/{data}.json"
    plots, work = Path(plots or f"plots/pretrain/{data}"), Path(work or f"work/pretrain/{data}")
    main_process = recipe.rank() == 0  # under a multi-process launcher only rank 0 writes files

    mon = Monitor(memory or f"plots/monitor/pretrain_{data}", p["train"]["monitor_interval"])
    with mon if main_process else contextlib.nullcontext():
        model, processor = recipe.load_base(base, cfg.attn_implementation)
        dataset = ConversationDataset(captions, processor, max_length=cfg.max_length, desc=f"encode {captions}")
        recipe.prepare_work_dir(work, recipe.fingerprint(cfg, Path(captions).parent, base))
        live = Live(str(plots), dvcyaml=None, save_dvc_exp=False) if main_process else None
        figures, rows = recipe.stage_one(model, dataset, recipe.make_collator(processor.tokenizer.pad_token_id, cfg),
                                         cfg, work, live=live)
        if main_process:
            with io.atomic_path(out) as tmp:
                tmp.mkdir()
                recipe.save_stage1(model, figures, rows, tmp, measured=False)  # a DVC output: the same bytes every run
                # per-sample rejects (missing image, no answer tokens, too long) travel with the connector
                io.write_jsonl(tmp / "rejects.jsonl", [dict(r, file=str(captions)) for r in dataset.rejects])
            live.end()
            Path(live.metrics_file).unlink(missing_ok=True)  # dvclive's summary repeats the last step
    if not main_process:
        return
    rejects = dataset.reject_counts()
    io.write_metrics(metrics, {"stage1": figures, "stage1_loss": figures["final_loss"],
                               "rejects": {**rejects, "total": sum(rejects.values())}, "monitor": mon.peaks})
    shutil.rmtree(work)  # finished: the checkpoints were only for resuming
    print(f"pretrain@{data}: stage-1 loss {figures['final_loss']:.3f}, {figures['steps']} steps, "
          f"{mon.peaks['wall_s']:.0f} s -> {out}")


if __name__ == "__main__":
    fire.Fire(main)
