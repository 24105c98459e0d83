"""Stage `train@<run>`: MGM's stage 2 for one entry of `runs:` in params.yaml.

    python stages/train.py --name baseline --base models/zoo --pretrained models/pretrain/raw \
        --instruct data/world/instruct/llava.json --out models/runs/baseline \
        --metrics metrics/train/baseline.json --plots plots/train/baseline \
        --memory plots/monitor/train_baseline --work work/train/baseline

The base model with the connector stage 1 trained on the run's captions (`pretrain@<data>`), then
the run's strategy (full | lora) on the instruction set; its curves continue stage 1's. Re-run
after an interruption, it resumes from the last checkpoint in --work.
Launch with `deepspeed --num_gpus N` or `torchrun` instead of `python` (params train.launcher).
"""
import sys
from pathlib import Path

# this checkout's vlmlab before any installed copy: a clone or a `dvc exp run --temp` copy runs its own code
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning, so two compute threads
# on a 2-core machine shared with other processes slow down gracefully (spinning threads
# measured 3x slower than one thread under load; sleeping ones as fast as one thread).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from vlmlab.determinism import pin; pin(threads=2)  # noqa: E402,E702  CPU kernels bit for bit on any x86 (vlmlab/determinism.py); 2 threads: as before, on any core count

import contextlib  # noqa: E402
import shutil  # noqa: E402

import fire  # noqa: E402
from dvclive import Live  # noqa: E402

from vlmlab import io  # noqa: E402
from vlmlab.determinism import relax_cuda  # noqa: E402
from vlmlab.data.collate import ConversationDataset  # noqa: E402
from vlmlab.monitor import Monitor  # noqa: E402
from vlmlab.params import load as load_params  # noqa: E402
from vlmlab.train import recipe, strategies  # noqa: E402


def main(name: str, base: str = "models/zoo", pretrained: str = "models/pretrain/raw",
         instruct: str = "data/world/instruct/llava.json", out: str = "", metrics: str = "", plots: str = "",
         memory: str = "", work: str = "", params: str = "params.yaml", local_rank: int = -1) -> None:
    # local_rank: passed by the `deepspeed` launcher; the Trainer reads LOCAL_RANK from the environment.
    # Option names must not prefix torchrun's own (it rejects --run, --monitor as ambiguous).
    run = name
    p = load_params(params)
    if not p["train"]["cuda_deterministic"]:
        relax_cuda()  # CUDA hosts: the fast kernels (a CPU run stays pinned, bit for bit)
    runs = p.get("runs") or {}
    if run not in runs:
        raise io.fail(f"run {run!r} is not in params.yaml runs: ({', '.join(runs) or 'empty'}); add it there")
    cfg = recipe.TrainConfig.from_params(p["train"], runs[run], seed=p["seed"] + recipe.SEED_OFFSET, name=run)
    out, metrics = out or f"models/runs/{run}", metrics or f"metrics/train/{run}.json"
    plots, work = Path(plots or f"plots/train/{run}"), Path(work or f"work/train/{run}")
    main_process = recipe.rank() == 0  # under a multi-process launcher only rank 0 writes files

    mon = Monitor(memory or f"plots/monitor/train_{run}", p["train"]["monitor_interval"])
    with mon if main_process else contextlib.nullcontext():
        model, processor = recipe.load_base(base, cfg.attn_implementation)
        stage1 = recipe.load_stage1(model, Path(pretrained))
        data = ConversationDataset(instruct, processor, max_length=cfg.max_length, desc=f"encode {instruct}")
        recipe.prepare_work_dir(work, recipe.fingerprint(cfg, pretrained, Path(instruct).parent, base))
        # the curves are redrawn from the checkpoints' history (DVC deletes plots/ before a re-run): no dvclive resume
        live = Live(str(plots), dvcyaml=None, save_dvc_exp=False) if main_process else None
        model, trainer, figures = recipe.stage_two(model, data, recipe.make_collator(processor.tokenizer.pad_token_id, cfg),
                                                   cfg, work, stage1, live=live, base_path=base)
        recipe.save_trained(model, trainer, out, processor)  # a LoRA adapter names `base` (set by stage_two)
        if live is not None:
            live.end()
            # dvclive's own summary repeats the last step; the run's figures are in `metrics`
            Path(live.metrics_file).unlink(missing_ok=True)
    if not main_process:
        return
    trainable = strategies.trainable_counts(model)
    # stage 1's rejects are in pretrain@<data>'s folder and metrics
    rejects = {f"instruct_{reason}": n for reason, n in data.reject_counts().items()}
    # per-sample rejects (missing image, no answer tokens, too long) travel with the model they concern
    io.write_jsonl(Path(out) / "rejects.jsonl", [dict(r, file=str(instruct)) for r in data.rejects])
    io.write_metrics(metrics, recipe.run_metrics(figures, trainable, {**rejects, "total": sum(rejects.values())},
                                                 mon.peaks))
    shutil.rmtree(work)  # finished: the checkpoints were only for resuming
    print(f"train@{run}: {cfg.strategy}, stage-2 loss {figures['stage2']['loss']:.3f}, "
          f"{trainable['total']:,} trainable params, {mon.peaks['wall_s']:.0f} s -> {out}")


if __name__ == "__main__":
    fire.Fire(main)
