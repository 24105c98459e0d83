"""The MGM two-stage recipe on Hugging Face `Trainer`.

stage 1 (pretrain): connector only (projector + patch-info mining) on caption data;
stage 2 (instruction tuning): the run's strategy (`full` or `lora`) on conversations.

As in MGM's scripts, stage 1 runs once per caption set (stage `pretrain@<data>`, `stage_one`) and
every run on that set starts stage 2 from its connector (stage `train@<run>`, `stage_two`):
it depends on the data alone, not on the run's strategy. `two_stage` does both in one process.

Each stage is one `Trainer.train()` writing checkpoints to its own folder under the run's
work dir, so an interrupted run re-run with the same config resumes from the last one: a
finished stage 1 is kept (as its connector weights) and skipped, stage 2 resumes from
its last checkpoint. A work dir made under another config is wiped, never resumed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from vlmlab import io
from vlmlab.models.load import load_model, on_gpu, training_dtype
from vlmlab.seeding import seed_everything
from vlmlab.train import fast, strategies
from vlmlab.train.fast import Levers
from vlmlab.train.live import RATES, LiveCallback, curve_row
from vlmlab.train.strategies import LoraParams


@dataclass
class StageConfig:
    """One stage's optimisation; every knob but weight_decay comes from params.yaml `train:` (stage1_*/stage2_*)."""
    epochs: float                  # passes over the stage's data (MGM: 1)
    lr: float                      # MGM stage 1: 1e-3; stage 2 (2B, full): 2e-5 (runs.<run>.lr)
    global_batch: int              # samples per optimizer step, all devices and accumulation (MGM: 256 / 128)
    micro_batch: int               # samples per device per forward; accumulation makes up the rest
    warmup_ratio: float            # share of steps with linear warmup
    scheduler: str                 # transformers lr_scheduler_type
    weight_decay: float = 0.0      # MGM: 0 (not a params knob)


SEED_OFFSET = 400  # the training stages' share of the master seed (pretrain@<set> and train@<run> alike)
STAGE_KEYS = ("epochs", "lr", "global_batch", "micro_batch", "warmup_ratio", "scheduler")  # train.stage<N>_<key>


@dataclass(kw_only=True)
class TrainConfig:
    """A run's training config: params.yaml `train:` + one entry of `runs:` (see from_params); no defaults here."""
    stage1: StageConfig
    stage2: StageConfig | None      # None: stage 1 only (the pretrain stage, shared by every run on its data)
    strategy: str | None            # stage 2: full | lora
    lora: LoraParams | None         # lora runs only
    gradient_checkpointing: bool    # trade compute for activation memory (large models on GPU)
    attn_implementation: str        # sdpa | eager | flash_attention_2 (where flash-attn is installed)
    deepspeed: str                  # configs/deepspeed/zero2.json etc.; "" = plain torch
    save_steps: int                 # checkpoint every N optimizer steps (resume granularity); 0: none
    workers: int                    # dataloader workers; data is pre-encoded, 0 is fastest on 2 cores
    group_by_length: bool           # batches of similar length (less padding)
    max_length: int                 # reject samples longer than this many tokens (0: keep all)
    levers: Levers                  # speed levers, CUDA only (vlmlab/train/fast.py)
    seed: int

    def __post_init__(self):
        if self.stage2 is not None:
            strategies.check_strategy(self.strategy)
        for name, sc in (("stage1", self.stage1), ("stage2", self.stage2)):
            if sc is not None and (sc.global_batch <= 0 or sc.micro_batch <= 0 or sc.epochs <= 0 or sc.lr <= 0):
                raise io.fail(f"train.{name}: batch sizes, epochs and lr must be > 0 (got {asdict(sc)}) in params.yaml")

    @classmethod
    def from_params(cls, train: dict, run: dict | None, seed: int, name: str = "run") -> "TrainConfig":
        """params.yaml `train:` section + the entry `runs.<name>` -> config (one clear line on a bad key).
        run=None: stage 1 alone, which no run's own knobs touch (the pretrain stage)."""
        from vlmlab import params

        train = params.check_section("train", train)
        stage1 = StageConfig(**{k: train[f"stage1_{k}"] for k in STAGE_KEYS})
        stage2, lora = None, None
        if run is not None:
            run = params.check_run(name, run)
            stage2 = StageConfig(**{k: run["lr"] if k == "lr" else train[f"stage2_{k}"] for k in STAGE_KEYS})
            if run["strategy"] == "lora":
                lora = LoraParams(r=run["lora_r"], alpha=run["lora_alpha"], dropout=run["lora_dropout"],
                                  target_modules=list(train["lora_targets"]))
        return cls(stage1=stage1, stage2=stage2, strategy=run and run["strategy"], lora=lora, seed=seed,
                   deepspeed=train["deepspeed"] or "", levers=Levers.from_params(train),
                   **{k: train[k] for k in ("gradient_checkpointing", "attn_implementation", "save_steps", "workers",
                                            "group_by_length", "max_length")})


def load_base(base: str | Path, attn_implementation: str = "sdpa"):
    """(fp32 MGM model, processor) from a base folder such as models/zoo."""
    if not (Path(base) / "config.json").is_file():
        raise io.fail(f"{base}: no base model folder (config.json missing); run `dvc repro zoo` first")
    # the ConvNeXt tower has no attention: MgmForConditionalGeneration sets it to eager whatever is asked
    return load_model(base, dtype=torch.float32, attn_implementation=attn_implementation)


def levers_in_effect(cfg: TrainConfig) -> Levers:
    """cfg.levers on a CUDA host, none on a CPU; under DeepSpeed no frozen_bf16 (its bf16 mode already
    keeps the weights in bf16 and float32 masters of the trainable ones)."""
    lv = cfg.levers.on(on_gpu())
    return replace(lv, frozen_bf16=False) if cfg.deepspeed else lv


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank under torchrun/deepspeed launchers (0 for a plain `python` run)."""
    return int(os.environ.get("RANK", "0"))


def accumulation(sc: StageConfig, world: int) -> tuple[int, int]:
    """(micro batch, accumulation steps) that make up exactly `global_batch` samples per step."""
    micro = min(sc.micro_batch, max(1, sc.global_batch // world))
    accum, rest = divmod(sc.global_batch, micro * world)
    if rest or accum == 0:
        raise io.fail(f"global batch {sc.global_batch} is not a multiple of micro batch {micro} x {world} device(s); "
                      "fix train.stage*_global_batch / train.stage*_micro_batch in params.yaml")
    return micro, accum


def training_args(sc: StageConfig, cfg: TrainConfig, out_dir: Path):
    from transformers import TrainingArguments

    micro, accum = accumulation(sc, world_size())
    lv = levers_in_effect(cfg)
    extra = {}
    if lv.any:  # a CPU run keeps transformers' defaults: its outputs stay bit for bit
        extra = {"optim": "adamw_torch_fused" if lv.fused_adamw else "adamw_torch",
                 # the NaN filter reads the loss on the host after every backward: a sync in mid-step
                 "logging_nan_inf_filter": not lv.no_host_syncs}
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        num_train_epochs=sc.epochs,
        learning_rate=sc.lr,
        lr_scheduler_type=sc.scheduler,
        warmup_steps=sc.warmup_ratio,  # a float < 1 is a ratio of all steps
        weight_decay=sc.weight_decay,
        bf16=on_gpu(),
        use_cpu=not on_gpu(),
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # frozen embeddings need no input grads
        deepspeed=cfg.deepspeed or None,
        logging_steps=1,
        save_strategy="steps" if cfg.save_steps > 0 else "no",  # 0: no checkpoints (benchmarks)
        save_steps=cfg.save_steps,
        save_total_limit=1,  # resume needs only the last one
        report_to="none",    # LiveCallback logs both stages on one dvclive step axis
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=lv.cuda_workers or cfg.workers,
        dataloader_pin_memory=on_gpu(),
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        **extra,
    )


class EpochSeededLengthSampler(torch.utils.data.Sampler):
    """transformers' length grouping (batches of similar length, shuffled), ordered by (seed, epoch) only.

    Why not `train_sampling_strategy="group_by_length"`: its sampler draws from the global RNG,
    so a run resumed mid-epoch would see other batches than the run it continues.
    """

    def __init__(self, lengths: list[int], group_size: int, seed: int):
        self.lengths, self.group_size, self.seed, self.epoch = lengths, group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's dataloader calls it before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=g))


STAGING = ".checkpoint-staging"  # a checkpoint is written here whole, then renamed to checkpoint-N


def is_complete_checkpoint(folder: Path) -> bool:
    """trainer_state.json is the Trainer's last write into a checkpoint: without it (or unreadable) it is partial."""
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(run_dir: Path, clean: bool = True) -> str | None:
    """The newest complete `checkpoint-N` in `run_dir`, or None.

    Partial ones (a save killed half-way by an older version, which wrote in place) and a
    leftover staging folder are removed when `clean` (rank 0): they are this program's own
    work files, and a later rotation must not mistake them for the newest checkpoint.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not run_dir.is_dir():
        return None
    found = sorted((int(d.name.rsplit("-", 1)[1]), d) for d in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                   if d.is_dir() and d.name.rsplit("-", 1)[1].isdigit())
    last = None
    for _, folder in reversed(found):
        if last is None and is_complete_checkpoint(folder):
            last = folder
        elif last is None and clean:
            print(f"{folder}: incomplete checkpoint (no readable trainer_state.json), removed", flush=True)
            shutil.rmtree(folder)
    if clean:
        shutil.rmtree(run_dir / STAGING, ignore_errors=True)
    return str(last) if last is not None else None


def publish_checkpoint(staged: Path, run_dir: Path) -> None:
    """Rename a whole staged checkpoint into place, then drop the older ones (resume needs only the last)."""
    target = run_dir / staged.name
    if target.exists():
        shutil.rmtree(target)
    os.replace(staged, target)
    for old in run_dir.glob("checkpoint-*"):
        if old != target and old.is_dir():
            shutil.rmtree(old)
    shutil.rmtree(staged.parent, ignore_errors=True)


def make_trainer(model, args, dataset, collator, callbacks, group_by_length: bool, levers: Levers = Levers()):
    from transformers import Trainer

    class MgmTrainer(Trainer):
        _staging: str | None = None
        _tokens: torch.Tensor | None = None  # tokens counted on the device since the last log (no_host_syncs)

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            if levers.group_images:
                return fast.ImageGroupedSampler(fast.image_keys(ds), self.args.data_seed)
            if not group_by_length:
                return super()._get_train_sampler(train_dataset)
            return EpochSeededLengthSampler([len(s["input_ids"]) for s in ds.samples],
                                            self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            self.args.data_seed)

        def _track_num_input_tokens(self, inputs):
            # transformers reads the count on the host after every backward; here it stays on the
            # device until the log, which reads the loss anyway (one sync a step, not two)
            if not levers.no_host_syncs or world_size() > 1 or "attention_mask" not in inputs \
                    or self.args.include_num_input_tokens_seen != "non_padding":
                return super()._track_num_input_tokens(inputs)
            n = inputs["attention_mask"].sum()
            self._tokens = n if self._tokens is None else self._tokens + n

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            if self._tokens is not None:
                self.state.num_input_tokens_seen += int(self._tokens.item())
                self._tokens = None
            return super()._maybe_log_save_evaluate(*args, **kwargs)

        def _get_output_dir(self, trial):
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            # transformers writes checkpoint-N in place, trainer_state.json last: a kill inside leaves a
            # folder that looks newest and cannot be resumed. Write it whole under STAGING, then rename.
            run_dir = Path(super()._get_output_dir(trial))
            staging = run_dir / STAGING
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self._staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            except Exception as e:
                if io.is_user_write_error(e, staging):  # the last complete checkpoint is still there to resume
                    raise io.cannot_write(run_dir / f"checkpoint-{self.state.global_step}", e) from None
                raise
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()  # every rank's shards are in before the rename
            if self.args.should_save:
                publish_checkpoint(staging / f"checkpoint-{self.state.global_step}", run_dir)
            self.accelerator.wait_for_everyone()

    from transformers.trainer_callback import PrinterCallback

    trainer = MgmTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # a dict per step is noise; LiveCallback prints every 10%
    return trainer


def step_rows(log_history: list[dict]) -> list[dict]:
    """The per-step rows of a Trainer's log history (the end-of-training summary has no `loss`)."""
    return [r for r in log_history if "loss" in r and "step" in r]


def stage_figures(rows: list[dict], trainer, n_samples: int, epochs: float, wall: float, last: str | None) -> dict:
    """A stage's final numbers from its whole log history, restored with each checkpoint: a resumed
    run (even one resumed at its final step, training nothing) reports what an uninterrupted one does."""
    losses = [r["loss"] for r in rows]
    # throughput: the first step (allocator, lazy init) is left out when possible
    timed = [r for r in rows[1:] or rows if "step_s" in r]
    step_s = sum(r["step_s"] for r in timed)
    return {
        "loss": sum(losses) / len(losses) if losses else float("nan"),  # = Trainer's train_loss when logging every step
        "final_loss": losses[-1] if losses else float("nan"),
        "first_loss": losses[0] if losses else float("nan"),
        "steps": int(trainer.state.global_step),
        "samples": n_samples * float(epochs),
        "tokens": int(trainer.state.num_input_tokens_seen),
        "wall_s": round(wall, 2),
        "samples_per_s": round(sum(r["samples_per_s"] * r["step_s"] for r in timed) / max(step_s, 1e-9), 2),
        "tokens_per_s": round(sum(r["tokens_per_s"] * r["step_s"] for r in timed) / max(step_s, 1e-9), 1),
        "resumed_from_step": int(last.rsplit("-", 1)[-1]) if last else 0,
    }


def run_stage(model: nn.Module, dataset, collator, sc: StageConfig, cfg: TrainConfig, out_dir: Path,
              callbacks=(), live=None, step_offset: int = 0, stage: int = 1, earlier_rows=()):
    """One `Trainer.train()`, resumed from the last complete checkpoint in `out_dir` if there is one.

    `earlier_rows`: the curve rows of the stages before (already offset), replayed into `live`.
    Returns (trainer, figures, rows): figures are the stage's final numbers (flat, for metrics),
    rows its per-step curve rows (step offset applied).
    """
    args = training_args(sc, cfg, out_dir)
    logger = LiveCallback(live, len(dataset), args.train_batch_size * args.gradient_accumulation_steps * world_size(),
                          step_offset=step_offset, stage=stage, earlier_rows=earlier_rows)
    trainer = make_trainer(model, args, dataset, collator, [logger, *callbacks], cfg.group_by_length,
                           levers_in_effect(cfg))
    last = last_complete_checkpoint(out_dir, clean=rank() == 0)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    rows = step_rows(trainer.state.log_history)
    figures = stage_figures(rows, trainer, len(dataset), sc.epochs, time.perf_counter() - t0, last)
    return trainer, figures, [curve_row(r, step_offset, stage) for r in rows]


# ---------------------------------------------------------------- work dir and resume

WORK_FORMAT = 2  # 2: stage1/figures.json holds {figures, rows}; checkpoints carry step rates in their log history


def fingerprint(cfg: TrainConfig, *paths: str | Path) -> str:
    """Config + input files' bytes (+ the work dir's format): a checkpoint is only resumed under the exact same run."""
    h = hashlib.sha256(json.dumps({"work_format": WORK_FORMAT, **asdict(cfg)}, sort_keys=True, default=str).encode())
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            # small files by content (a retrained tiny zoo keeps its sizes); big ones by size and
            # mtime (hashing a 2B model's GBs on every start would be slow; a rebuild touches them)
            st = f.stat()
            h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{st.st_size}".encode())
            h.update(f.read_bytes() if st.st_size < 64 * 2**20 else str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def prepare_work_dir(work: Path, fp: str, timeout_s: float = 600) -> bool:
    """Make `work` for this fingerprint; True if it already held this run's progress (resume).

    Rank 0 wipes and stamps; other ranks (no process group exists yet) wait for its stamp.
    """
    stamp = work / "fingerprint.txt"
    stamped = lambda: stamp.is_file() and stamp.read_text().strip() == fp  # noqa: E731
    if rank() != 0:
        t0 = time.monotonic()
        while not stamped():
            if time.monotonic() - t0 > timeout_s:
                raise io.fail(f"{work}: rank 0 did not prepare the work dir within {timeout_s:.0f} s")
            time.sleep(0.5)
        return any(work.glob("stage*/checkpoint-*")) or (work / "stage1" / CONNECTOR).is_file()
    if work.is_dir() and stamped():
        return True
    if work.exists():
        shutil.rmtree(work)  # another config's checkpoints must never be resumed
    work.mkdir(parents=True)
    with io.atomic_path(stamp) as tmp:
        tmp.write_text(fp + "\n")
    return False


def save_connector(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if k.split(".", 1)[0] in strategies.CONNECTOR_MODULES}
    with io.atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_connector(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected:
        raise io.fail(f"{path}: unexpected keys {unexpected[:3]}: stage-1 weights of another model; delete {path.parent}")


# stage 1's result, in a pretrain@<data> folder (or work/stage1 of a run that does both stages)
CONNECTOR, FIGURES = "connector.safetensors", "figures.json"
MEASURED = ("wall_s", "samples_per_s", "tokens_per_s", "resumed_from_step")  # this process's, not the result's


def save_stage1(model: nn.Module, figures: dict, rows: list[dict], folder: Path, measured: bool = True) -> None:
    """The connector and what stage 1 did (losses, steps, its curve). measured=False leaves out this
    process's measurements (times, rates, resume): the same training then writes the same bytes."""
    if not measured:
        figures = {k: v for k, v in figures.items() if k not in MEASURED}
        rows = [{k: v for k, v in r.items() if k not in RATES} for r in rows]
    save_connector(model, folder / CONNECTOR)
    io.write_json(folder / FIGURES, {"figures": figures, "rows": rows})


def load_stage1(model: nn.Module, folder: Path) -> tuple[dict, list[dict]]:
    """Stage 1's connector into `model`; returns its (figures, curve rows)."""
    if not (folder / CONNECTOR).is_file() or not (folder / FIGURES).is_file():
        raise io.fail(f"{folder}: no stage-1 result ({CONNECTOR} + {FIGURES}); run `dvc repro pretrain` first")
    load_connector(model, folder / CONNECTOR)
    saved = json.loads((folder / FIGURES).read_text())
    return saved["figures"], saved["rows"]


# ---------------------------------------------------------------- the two stages

def prepare_stage(model: nn.Module, stage: int, cfg: TrainConfig, stash: dict | None, base_path: str | None = None):
    """The stage's trainable set (strategies) and the speed levers in effect; returns the model to train
    (a PeftModel for stage 2 `lora`). `stash`: float32 values of weights stored in bf16, kept across
    stages (None: no later stage trains what is frozen now)."""
    lv = levers_in_effect(cfg)
    mgm = fast.mgm_of(model)
    if lv.liger_kernels and not vars(mgm).get("_liger_applied"):
        note = fast.apply_liger(model)  # before any LoRA wrapping: its layers then sit inside Liger's MLP
        mgm._liger_applied = True
        if note:
            print(note, flush=True)
    if stage == 1:
        strategies.stage1(model)  # no seeding here: the Trainer seeds everything with cfg.seed first
    else:
        seed_everything(cfg.seed + 1)  # same LoRA init whether or not stage 1 ran in this process
        model = strategies.stage2(model, cfg.strategy, cfg.lora, base_path)
    if lv.frozen_bf16:
        fast.split_precision(model, stash)
        fast.lora_inputs_as_is(model)
    fast.set_fast_paths(model, lv)
    return model


def make_collator(pad_token_id: int, cfg: TrainConfig):
    """The stage's collator: each distinct image sent once per batch under dedup_towers."""
    from vlmlab.data.collate import PadCollator

    return PadCollator(pad_token_id, dedup_images=levers_in_effect(cfg).dedup_towers)


def prepare_data(cfg: TrainConfig, *datasets) -> None:
    """Stored pixels in bf16 where the towers are (frozen_bf16): the same values they would be cast to."""
    if levers_in_effect(cfg).frozen_bf16:
        for data in datasets:
            fast.cast_pixels(data)


def stage_one(model: nn.Module, captions, collator, cfg: TrainConfig, work: str | Path, live=None, callbacks=(),
              stash: dict | None = None) -> tuple[dict, list[dict]]:
    """Stage 1 on `model` in place: the connector on caption data, resumed from work/stage1's last
    checkpoint. `stash`: see prepare_stage (None when no stage 2 follows in this process).
    Returns (figures, curve rows)."""
    prepare_data(cfg, captions)
    model = prepare_stage(model, 1, cfg, stash)
    _, figures, rows = run_stage(model, captions, collator, cfg.stage1, cfg, Path(work) / "stage1", callbacks, live, stage=1)
    return figures, rows


def stage_two(model: nn.Module, instruct, collator, cfg: TrainConfig, work: str | Path, stage1: tuple[dict, list],
              live=None, base_path: str | None = None, callbacks=(), stash: dict | None = None):
    """Stage 2 (the run's strategy) on `model`, whose connector stage 1 trained: `stage1` = (its figures,
    its curve rows), which the curves continue. `base_path` is the base folder a `lora` adapter names.

    Returns (trained model — a PeftModel for `lora` —, the stage-2 Trainer, figures by stage)."""
    fig1, rows1 = stage1
    prepare_data(cfg, instruct)
    stash = {} if stash is None else stash
    model = prepare_stage(model, 2, cfg, stash, base_path)
    stash.clear()  # what stage 2 trains has its float32 values back; the rest stays frozen
    trainer, fig2, _ = run_stage(model, instruct, collator, cfg.stage2, cfg, Path(work) / "stage2", callbacks, live,
                                 step_offset=fig1["steps"], stage=2, earlier_rows=rows1)
    return model, trainer, {"stage1": fig1, "stage2": fig2}


def two_stage(model: nn.Module, captions, instruct, collator, cfg: TrainConfig, work: str | Path,
              live=None, base_path: str | None = None, callbacks=()):
    """Stage 1 then stage 2 in one process (`model`: fp32, loaded from the base folder); a stage 1
    finished in an earlier, interrupted call is loaded from work/stage1, not run again.
    Returns what `stage_two` does."""
    s1 = Path(work) / "stage1"
    stash: dict = {}
    if (s1 / CONNECTOR).is_file() and (s1 / FIGURES).is_file():
        figures, rows = load_stage1(model, s1)
        figures["skipped"] = 1
    else:
        figures, rows = stage_one(model, captions, collator, cfg, work, live, callbacks, stash)
        if rank() == 0:
            save_stage1(model, figures, rows, s1)
        figures["skipped"] = 0
    return stage_two(model, instruct, collator, cfg, work, (figures, rows), live, base_path, callbacks, stash)


def save_trained(model: nn.Module, trainer, out: str | Path, processor=None) -> None:
    """models/runs/<run>/: a complete MGM folder (full) or a peft adapter folder (lora), + processor.

    Saved in the training dtype (bf16 on CUDA, fp32 on CPU); LoRA adapters name their base by the
    `base_path` given to `two_stage` (relative to the repository root, as vlmlab.infer.load_model expects).
    """
    from peft import PeftModel

    # ZeRO-3 partitions the weights across ranks: gathering them is collective (every rank)
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if is_zero3(trainer) else None
    if not trainer.is_world_process_zero():
        return
    with io.atomic_path(out) as tmp:
        if isinstance(model, PeftModel):
            model.save_pretrained(str(tmp), state_dict=state)
        else:
            dtype = training_dtype()
            state = {k: v.to(dtype) for k, v in state.items()} if state is not None else None
            model.to(dtype).save_pretrained(str(tmp), state_dict=state)
        if processor is not None:
            processor.save_pretrained(str(tmp))


def run_metrics(figures: dict, trainable: dict, rejects: dict, monitor: dict) -> dict:
    """The run's final figures, flat enough for `dvc exp show` (nested dicts become dotted keys)."""
    s1, s2 = figures["stage1"], figures["stage2"]
    own = [s2] + ([s1] if "wall_s" in s1 and not s1.get("skipped") else [])  # a loaded stage 1 is not this run's time
    train_s = sum(s["wall_s"] for s in own)
    return {
        "train_loss": s2["loss"],            # stage 2 mean loss (answer tokens only)
        "final_loss": s2["final_loss"],      # last logged stage-2 step
        "stage1_loss": s1["final_loss"],
        "wall_s": monitor.get("wall_s", train_s),
        "train_s": round(train_s, 2),
        "samples_per_s": round(sum(s["samples"] for s in own) / max(train_s, 1e-9), 2),
        "tokens_per_s": round(sum(s["tokens"] for s in own) / max(train_s, 1e-9), 1),
        "stage1": {k: v for k, v in s1.items() if isinstance(v, (int, float))},
        "stage2": {k: v for k, v in s2.items() if isinstance(v, (int, float))},
        "trainable": trainable,
        "rejects": rejects,
        "monitor": monitor,
    }


def is_zero3(trainer) -> bool:
    ds = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(ds and ds.zero_stage == 3)
