"""Training: data encoding/collation, the strategies' parameter sets, the two-stage recipe, resume.

Everything runs the real MgmForConditionalGeneration (tiny preset) on real tiny-world data
(64 captions, 32 conversations), on CPU, seeded.
"""
import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from vlmlab import io
from vlmlab.data.collate import IGNORE_INDEX, ConversationDataset, PadCollator
from vlmlab.models import presets
from vlmlab.sim.lm_tokenizer import train_world_tokenizer
from vlmlab.train import recipe, strategies
from vlmlab.params import load as load_params
from vlmlab.train.recipe import StageConfig, TrainConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Tiny-world raw captions + instruction set, as `prepare` writes them."""
    from conftest import simulate_raw

    root = tmp_path_factory.mktemp("world")
    params = {"seed": 3, "world": {"raw_size": 64, "curated_size": 1, "instruct_size": 32, "eval_textvqa": 1,
                                   "eval_caption": 8, "eval_mmbench": 1, "workers": 1}}
    simulate_raw(root, params)
    return root


def texts_of(*paths):
    for path in paths:
        for rec in json.loads(Path(path).read_text()):
            for turn in rec["conversations"]:
                yield turn["value"].replace("<image>", "")


@pytest.fixture(scope="module")
def base(world, tmp_path_factory) -> Path:
    """A saved base folder (model + processor), as the zoo stage writes it, random-initialised."""
    torch.manual_seed(0)
    tok = train_world_tokenizer(texts_of(world / "raw/llava.json", world / "world/instruct/llava.json"))
    model, processor = presets.build("tiny", tok)
    folder = tmp_path_factory.mktemp("zoo") / "zoo"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(world, base):
    _, processor = recipe.load_base(base)
    return (ConversationDataset(world / "raw/llava.json", processor),
            ConversationDataset(world / "world/instruct/llava.json", processor), processor)


TRAIN = load_params(Path(__file__).resolve().parents[1] / "params.yaml")["train"]


def small_config(strategy="full", **kw) -> TrainConfig:
    """params.yaml's train section with tiny batches (the only defaults are params.yaml's)."""
    train = {**TRAIN, "stage1_global_batch": 16, "stage1_micro_batch": 8, "stage1_lr": 1e-3,
             "stage2_global_batch": 8, "stage2_micro_batch": 8, "save_steps": 2, **kw}
    run = {"data": "raw", "strategy": strategy, "lr": 2e-3, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1}
    return TrainConfig.from_params(train, run, seed=7)


@torch.no_grad()
def mean_loss(model, dataset, pad_id) -> float:
    model.eval()
    batch = PadCollator(pad_id)(dataset.samples)
    return float(model(**batch).loss)


# ---------------------------------------------------------------- data

def test_dataset_counts_missing_images_from_the_real_seed_file(fixtures_dir, base):
    """The challenge's LLaVA json: 30 of 304 images are present; the other 274 are counted rejects."""
    _, processor = recipe.load_base(base)
    ds = ConversationDataset(fixtures_dir / "better_synth/stage_1.subset.json", processor,
                             image_root=fixtures_dir / "better_synth")
    assert len(ds) == 30
    assert ds.reject_counts() == {"missing_image": 274}
    # the 4 ALLaVA rows (3 with images) share nothing: every kept sample has its own pixels
    assert len({id(s["pixel_values"]) for s in ds.samples}) == 30


def test_collator_pads_right_and_masks_padding(data):
    captions, _, processor = data
    batch = PadCollator(processor.tokenizer.pad_token_id, pad_to_multiple_of=8)(captions.samples[:4])
    B, T = batch["input_ids"].shape
    lengths = [len(s["input_ids"]) for s in captions.samples[:4]]
    assert B == 4 and T % 8 == 0 and T >= max(lengths)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == processor.tokenizer.pad_token_id).all()
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values_aux"].shape == (4, 3, 96, 96)


def test_images_shared_by_several_captions_are_encoded_once(world, base, tmp_path):
    recs = json.loads((world / "raw/llava.json").read_text())[:4]
    doubled = recs + [dict(r, id=r["id"] + "b") for r in recs]  # the enhanced set: several captions per image
    path = tmp_path / "images"
    path.symlink_to(world / "raw/images")
    (tmp_path / "llava.json").write_text(json.dumps(doubled))
    _, processor = recipe.load_base(base)
    ds = ConversationDataset(tmp_path / "llava.json", processor)
    assert len(ds) == 8 and len({id(s["pixel_values_aux"]) for s in ds.samples}) == 4


def test_undecodable_images_are_counted_rejects_whatever_pil_raises(world, base, tmp_path, monkeypatch):
    # a truncated file (OSError) and an image over PIL's pixel limit (DecompressionBombError, not an
    # OSError) are both `bad_image` rejects with the file named, not a crash of the stage
    from PIL import Image

    recs = json.loads((world / "raw/llava.json").read_text())[:3]
    (tmp_path / "images").mkdir()
    for r in recs:
        (tmp_path / "images" / Path(r["image"]).name).write_bytes((world / "raw" / r["image"]).read_bytes())
        r["image"] = "images/" + Path(r["image"]).name
    (tmp_path / "images" / Path(recs[0]["image"]).name).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    _, processor = recipe.load_base(base)
    ok = ConversationDataset(tmp_path / "llava.json", processor)
    assert ok.reject_counts() == {"bad_image": 1}, ok.rejects
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)  # the 96 px world images are now "bombs"
    with pytest.raises(io.StageError, match=r"no usable training sample \({'bad_image': 3}\)"):
        ConversationDataset(tmp_path / "llava.json", processor)


# ---------------------------------------------------------------- strategies

def test_lora_trains_exactly_adapters_projector_and_mining(base):
    model, _ = recipe.load_base(base)
    lora = strategies.LoraParams(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    expected_lora = sum(lora.r * (m.in_features + m.out_features) for name, m in model.language_model.named_modules()
                        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.target_modules)
    connector = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in strategies.CONNECTOR_MODULES}
    peft_model = strategies.stage2(model, "lora", lora)
    counts = strategies.trainable_counts(peft_model)
    assert counts == {"lora": expected_lora, **connector, "total": expected_lora + sum(connector.values())}
    # no LoRA inside the vision towers, although CLIP has its own q_proj/v_proj
    assert not any(".lora_" in n and "vision_tower" in n for n, _ in peft_model.named_parameters())
    assert expected_lora > 0


def test_stage_parameter_sets(base):
    model, _ = recipe.load_base(base)
    assert set(strategies.trainable_counts(strategies.stage1(model))) == {*strategies.CONNECTOR_MODULES, "total"}
    full = strategies.trainable_counts(strategies.stage2(model, "full"))
    assert set(full) == {"language_model", *strategies.CONNECTOR_MODULES, "total"}


# ---------------------------------------------------------------- recipe

def test_stage1_leaves_language_model_and_towers_bit_identical(base, data, tmp_path):
    captions, _, processor = data
    model, _ = recipe.load_base(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategies.stage1(model)
    recipe.run_stage(model, captions, PadCollator(processor.tokenizer.pad_token_id), small_config().stage1,
                     small_config(), tmp_path / "s1")
    after = model.state_dict()
    frozen = [k for k in before if k.split(".")[0] in ("language_model", *strategies.TOWER_MODULES)]
    trained = [k for k in before if k.split(".")[0] in strategies.CONNECTOR_MODULES]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("weight"))


def test_tiny_run_loss_falls(base, data, tmp_path):
    captions, instruct, processor = data
    model, _ = recipe.load_base(base)
    cfg = small_config()
    cfg.stage2.epochs = 3
    loss_before = mean_loss(model, instruct, processor.tokenizer.pad_token_id)
    model, _, figures = recipe.two_stage(model, captions, instruct, PadCollator(processor.tokenizer.pad_token_id),
                                         cfg, tmp_path / "work")
    loss_after = mean_loss(model, instruct, processor.tokenizer.pad_token_id)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert figures["stage2"]["final_loss"] < figures["stage2"]["first_loss"]
    assert figures["stage1"]["steps"] == 4 and figures["stage2"]["steps"] == 12
    assert figures["stage2"]["tokens"] == 3 * instruct.num_tokens  # non-padding tokens, every epoch


class Interrupt(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Dies once step `step` of stage `stage` is done and logged, like a job killed between checkpoints."""

    def __init__(self, stage: int, step: int):
        self.stage, self.step, self.calls = stage, step, 0

    def on_train_begin(self, args, state, control, **kw):
        self.calls += 1

    def on_log(self, args, state, control, **kw):
        if self.calls == self.stage and state.global_step == self.step:
            raise Interrupt(f"stage {self.stage} step {self.step}")


def train_lora(base, data, work, callbacks=(), plots=None):
    from dvclive import Live

    captions, instruct, processor = data
    model, _ = recipe.load_base(base)
    cfg = small_config("lora")
    cfg.stage2.epochs = 2
    live = Live(str(plots), resume=(plots / "metrics.json").exists(), dvcyaml=None, save_dvc_exp=False) if plots else None
    model, _, figures = recipe.two_stage(model, captions, instruct, PadCollator(processor.tokenizer.pad_token_id),
                                         cfg, work, live=live, callbacks=callbacks)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, figures


def test_interrupted_and_resumed_run_ends_with_the_same_weights(base, data, tmp_path):
    reference, _ = train_lora(base, data, tmp_path / "straight")
    work, plots = tmp_path / "interrupted", tmp_path / "plots"
    with pytest.raises(Interrupt):                      # killed in stage 1 at step 3 (last checkpoint: step 2)
        train_lora(base, data, work, [InterruptAt(stage=1, step=3)], plots)
    with pytest.raises(Interrupt):                      # re-run: stage 1 resumes and ends; killed at stage-2 step 7
        train_lora(base, data, work, [InterruptAt(stage=2, step=7)], plots)
    resumed, figures = train_lora(base, data, work, plots=plots)  # re-run: stage 1 skipped, stage 2 resumes mid-epoch
    assert figures["stage1"]["skipped"] == 1 and figures["stage2"]["resumed_from_step"] == 6
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    # the curves read as one run: every step once, stage 2 continuing stage 1's 4 steps
    steps = [int(line.split("\t")[0]) for line in (plots / "plots/metrics/loss.tsv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 4 + 8 + 1))


def test_work_dir_of_another_config_is_wiped_not_resumed(tmp_path):
    work = tmp_path / "w"
    assert recipe.prepare_work_dir(work, "aaa") is False
    (work / "stage2").mkdir()
    assert recipe.prepare_work_dir(work, "aaa") is True and (work / "stage2").exists()
    assert recipe.prepare_work_dir(work, "bbb") is False and not (work / "stage2").exists()


# ---------------------------------------------------------------- bad params: one clear line

def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, io.StageError) and "\n" not in msg
    return msg


def test_a_missing_train_key_is_one_line_not_a_dataclass_default():
    train = {k: v for k, v in TRAIN.items() if k != "stage1_epochs"}
    with pytest.raises(SystemExit) as e:
        TrainConfig.from_params(train, {"data": "raw", "strategy": "full", "lr": 1e-3}, seed=3)
    assert one_line(e) == "error: params.yaml: missing key train.stage1_epochs (every knob is set in params.yaml)"


def test_bad_params_give_one_clear_line(tmp_path):
    train = TRAIN
    with pytest.raises(SystemExit) as e:
        TrainConfig.from_params(train, {"data": "raw", "strategy": "qlora", "lr": 1e-3}, seed=0)
    assert "runs.run.strategy = 'qlora'" in one_line(e) and "'full', 'lora'" in one_line(e)
    with pytest.raises(SystemExit) as e:
        TrainConfig.from_params(train, {"data": "raw", "strategy": "lora", "lr": 1e-3, "lora_r": 0}, seed=0, name="x")
    assert "runs.x.lora_r = 0" in one_line(e)
    with pytest.raises(SystemExit) as e:
        TrainConfig.from_params(train, {"data": "raw", "strategy": "full", "lr": 1e-3, "lora_rank": 8}, seed=0)
    assert "runs.run.lora_rank" in one_line(e)
    with pytest.raises(SystemExit) as e:
        TrainConfig.from_params({**train, "stage1_lrr": 1e-3}, {"data": "raw", "strategy": "full", "lr": 1e-3}, seed=0)
    assert "train.stage1_lrr (did you mean train.stage1_lr?)" in one_line(e)
    with pytest.raises(SystemExit) as e:
        recipe.accumulation(StageConfig(epochs=1, lr=1e-3, global_batch=12, micro_batch=8, warmup_ratio=0,
                                        scheduler="cosine"), world=1)
    assert "multiple" in one_line(e)
    with pytest.raises(SystemExit) as e:
        ConversationDataset(tmp_path / "data/enhanced/llava.json", processor=None)
    assert "data/enhanced/llava.json" in one_line(e) and "not found" in one_line(e)
    with pytest.raises(SystemExit) as e:
        recipe.load_base(tmp_path / "models/zoo")
    assert "zoo" in one_line(e)


# ---------------------------------------------------------------- the stage scripts, end to end

def load_stage(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"stage_{name}", Path(__file__).resolve().parents[1] / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_train_and_merge_stages_end_to_end(world, base, tmp_path):
    """stages/pretrain.py, stages/train.py (lora) then stages/merge.py, as dvc runs them, on a params file of tiny sizes."""
    import yaml

    pretrain_stage, train_stage, merge_stage = load_stage("pretrain"), load_stage("train"), load_stage("merge")

    params = yaml.safe_load(open("params.yaml"))
    params["train"].update(stage1_global_batch=32, stage1_micro_batch=32, stage2_global_batch=16,
                           stage2_micro_batch=16, save_steps=1)
    params["runs"] = {"tiny_lora": {"data": "raw", "strategy": "lora", "lr": 2e-3, "lora_r": 4, "lora_alpha": 8,
                                    "lora_dropout": 0.0}}
    params["merge"].update(samples=4, batch_size=2, runs=["tiny_lora"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    pretrain_stage.main("raw", base=str(base), captions=str(world / "raw/llava.json"), out=str(out / "pretrain/raw"),
                        metrics=str(out / "pretrain.json"), plots=str(out / "plots_pretrain"),
                        memory=str(out / "mon/pretrain"), work=str(out / "work_pretrain"), params=str(tmp_path / "params.yaml"))
    pre = json.loads((out / "pretrain.json").read_text())
    assert pre["stage1"]["steps"] == 2 and pre["rejects"]["total"] == 0 and pre["stage1"]["wall_s"] > 0
    saved = json.loads((out / "pretrain/raw/figures.json").read_text())  # a DVC output: no time or rate in it
    assert saved["figures"]["steps"] == 2 and "wall_s" not in saved["figures"] and len(saved["rows"]) == 2
    assert all("step_s" not in r and "loss" in r for r in saved["rows"])
    assert {p.name for p in (out / "pretrain/raw").iterdir()} == {"connector.safetensors", "figures.json", "rejects.jsonl"}
    assert not (out / "work_pretrain").exists()
    train_stage.main("tiny_lora", base=str(base), pretrained=str(out / "pretrain/raw"),
                     instruct=str(world / "world/instruct/llava.json"), out=str(out / "runs/tiny_lora"),
                     metrics=str(out / "metrics.json"), plots=str(out / "plots"), memory=str(out / "mon/train"),
                     work=str(out / "work"), params=str(tmp_path / "params.yaml"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage1"]["steps"] == 2 and metrics["stage2"]["steps"] == 2 and metrics["rejects"]["total"] == 0
    assert metrics["trainable"]["lora"] > 0 and "language_model" not in metrics["trainable"]
    adapter = json.loads((out / "runs/tiny_lora/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base) and len(adapter["modules_to_save"]) == 4
    assert (out / "runs/tiny_lora/mgm_processor.json").is_file()
    assert (out / "runs/tiny_lora/rejects.jsonl").read_text() == ""  # none in the tiny world
    assert len((out / "plots/plots/metrics/loss.tsv").read_text().splitlines()) == 1 + 4
    assert not (out / "plots/metrics.json").exists()  # dvclive's summary: the run's figures are in metrics
    assert (out / "mon/train.csv").is_file() and not (out / "work").exists()  # checkpoints gone once finished

    merge_stage.main(adapter=str(out / "runs/tiny_lora"), out=str(out / "merged"),
                     held_out=str(world / "world/eval/captions.jsonl"), metrics=str(out / "merge.json"),
                     monitor=str(out / "mon/merge"), params=str(tmp_path / "params.yaml"))
    merged = json.loads((out / "merge.json").read_text())
    assert merged["max_logit_diff"] < 1e-3 and merged["samples"] == 4
    assert (out / "merged/config.json").is_file() and (out / "merged/mgm_processor.json").is_file()

    with pytest.raises(SystemExit) as e:
        train_stage.main("nope", params=str(tmp_path / "params.yaml"))
    assert "'nope' is not in params.yaml runs" in one_line(e)


def test_fingerprint_sees_a_retrained_base_of_the_same_size(base, tmp_path):
    import shutil

    copy = tmp_path / "zoo"
    shutil.copytree(base, copy)
    before = recipe.fingerprint(small_config(), copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, other weights
    weights.write_bytes(bytes(data))
    assert recipe.fingerprint(small_config(), copy) != before
    assert recipe.fingerprint(small_config("lora"), copy) != recipe.fingerprint(small_config(), copy)
