"""The train stage's speed levers (vlmlab/train/fast.py, MgmForConditionalGeneration.fast): each computes
what the reference path computes (float32, CPU, tiny preset), and none is in effect on a CPU run."""

import pytest
import torch
import torch.nn.functional as F

from vlmlab.data.collate import PadCollator
from vlmlab.models import mgm as mgm_mod
from vlmlab.models.mgm import FastPaths, MgmForConditionalGeneration, answer_cross_entropy, upsample_bilinear
from vlmlab.models.presets import build_config
from vlmlab.train import fast, recipe, strategies
from vlmlab.train.fast import Levers

VOCAB, IMAGE_ID = 64, 64
ALL_ON = FastPaths(towers_no_grad=True, upsample_matmul=True, fused_mining=True, mining_matmul=True, loss="chunked")


def tiny_model(seed=0) -> MgmForConditionalGeneration:
    torch.manual_seed(seed)
    model = MgmForConditionalGeneration(build_config("tiny", vocab_size=VOCAB, image_token_id=IMAGE_ID))
    # the glue's LayerNorms start at (1, 0): perturb them so a wrong affine fold would show
    for name, p in model.named_parameters():
        if name.startswith(("vlm_uni_aux_projector.0", "vlm_uni_val_projector.0", "vlm_uni_query_projector.0")):
            p.data += 0.3 * torch.randn_like(p)
    return model


def samples(n_images=3, per_image=(1, 3, 2), seed=1) -> list[dict]:
    """Rows as ConversationDataset stores them: rows of one image share its pixel tensors."""
    g = torch.Generator().manual_seed(seed)
    n_tok = 16  # tiny: 4x4 image tokens
    rows = []
    for i in range(n_images):
        px, px_aux = torch.randn(3, 32, 32, generator=g), torch.randn(3, 96, 96, generator=g)
        for _ in range(per_image[i]):
            T = int(torch.randint(22, 30, (1,), generator=g))
            ids = torch.randint(1, VOCAB, (T,), generator=g)
            ids[1:1 + n_tok] = IMAGE_ID
            labels = torch.full((T,), -100)
            labels[-5:] = ids[-5:]
            rows.append({"input_ids": ids, "labels": labels, "pixel_values": px, "pixel_values_aux": px_aux})
    return rows


def loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    model.train()
    loss = model(**batch, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------- kernels

@pytest.mark.parametrize("hw,size", [((6, 6), (12, 12)), ((3, 3), (12, 12)), ((24, 24), (192, 192)), ((5, 7), (12, 9))])
def test_upsample_matmul_is_bilinear_interpolation(hw, size):
    x = torch.randn(2, 5, *hw, dtype=torch.float64)
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_bilinear(x, size), ref, rtol=0, atol=1e-12)
    cl = mgm_mod.upsample_bilinear_cl(x, size)
    assert cl.is_contiguous() and cl.shape == (2, *size, 5)
    torch.testing.assert_close(cl.permute(0, 3, 1, 2), ref, rtol=0, atol=1e-12)


def test_upsample_weights_are_exact_in_bf16_for_power_of_two_scales():
    for n_in, n_out in ((96, 192), (48, 192), (24, 192)):
        m = mgm_mod.bilinear_matrix(n_in, n_out, torch.float64, torch.device("cpu"))
        assert torch.equal(m.to(torch.bfloat16).double(), m)
        torch.testing.assert_close(m.sum(1), torch.ones(n_out, dtype=torch.float64))


@pytest.mark.parametrize("chunk_elements", [2**28, 64 * 7])  # one chunk; 7 rows a chunk (several, one partial)
@pytest.mark.parametrize("with_num_items", [False, True])
def test_answer_cross_entropy_equals_hf_loss_on_all_logits(monkeypatch, chunk_elements, with_num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    monkeypatch.setattr(mgm_mod, "CE_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 3, 11, 16, 64
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.5] = -100
    n_items = labels[:, 1:].ne(-100).sum() + 3 if with_num_items else None  # any divisor the Trainer passes

    ref = ForCausalLMLoss(hidden @ weight.T, labels, V, num_items_in_batch=n_items)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = answer_cross_entropy(hidden, weight, labels, n_items, impl="chunked")
    got_grads = torch.autograd.grad(got, (hidden, weight))
    # both upcast the logits to float32 (as HF does); only the summation order differs
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_answer_cross_entropy_changes_with_the_labels():
    """Not a constant: another target changes the loss (a test that can fail)."""
    hidden, weight = torch.randn(1, 6, 8), torch.randn(32, 8)
    labels = torch.tensor([[-100, -100, 3, 4, 5, 6]])
    other = labels.clone()
    other[0, -1] = 7
    assert not torch.isclose(answer_cross_entropy(hidden, weight, labels), answer_cross_entropy(hidden, weight, other))


# ---------------------------------------------------------------- the model's fast paths

@pytest.mark.parametrize("path", ["towers_no_grad", "upsample_matmul", "fused_mining", "mining_matmul", "loss", "all"])
def test_each_fast_path_computes_the_reference_loss_and_gradients(path):
    model = tiny_model()
    strategies.stage2(model, "full")  # LM + connector trainable: every gradient the fast paths touch
    batch = PadCollator(0)(samples())
    ref_loss, ref_grads = loss_and_grads(model, batch)
    model.fast = ALL_ON if path == "all" else FastPaths(**{path: "chunked" if path == "loss" else True})
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads, ref_grads)


def test_fused_mining_sees_a_changed_layernorm():
    """The fold uses the LayerNorm's own weight: changing it changes the mined features."""
    model = tiny_model()
    model.fast = FastPaths(fused_mining=True)
    tokens, aux = torch.randn(2, 16, 32 if model.config.mm_hidden_size == 32 else model.config.mm_hidden_size), None
    aux = torch.randn(2, model.config.mm_hidden_size_aux, 12, 12)
    with torch.no_grad():
        a = model.mine_patches(tokens, aux)
        model.vlm_uni_aux_projector[0].weight.mul_(2.0)
        b = model.mine_patches(tokens, aux)
    assert not torch.allclose(a, b)


def test_dedup_towers_equals_per_row_towers():
    """Rows sharing an image: pixels sent once + image_index give the per-row loss and gradients."""
    model = tiny_model()
    strategies.stage1(model)
    rows = samples()
    plain, dedup = PadCollator(0)(rows), PadCollator(0, dedup_images=True)(rows)
    assert dedup["pixel_values"].shape[0] == 3 and plain["pixel_values"].shape[0] == 6
    assert dedup["image_index"].tolist() == [0, 1, 1, 1, 2, 2]
    assert torch.equal(dedup["pixel_values"][dedup["image_index"]], plain["pixel_values"])
    ref_loss, ref_grads = loss_and_grads(model, plain)
    loss, grads = loss_and_grads(model, dedup)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads, ref_grads)


def test_eval_and_generation_keep_the_reference_outputs():
    """The fast loss is a training path: in eval mode the model returns its logits as before."""
    model = tiny_model().eval()
    batch = PadCollator(0)(samples())
    ref = model(**batch)
    model.fast = ALL_ON
    got = model(**batch)
    assert got.logits is not None
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- precision split

def test_split_precision_keeps_float32_values_for_what_trains_later():
    model = tiny_model()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    stash: dict = {}
    strategies.stage1(model)
    counts = fast.split_precision(model, stash)
    assert counts["fp32"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    strategies.stage2(model, "full")
    fast.split_precision(model, stash)
    for name, p in model.named_parameters():
        if name.startswith("language_model"):
            assert p.dtype == torch.float32 and torch.equal(p, original[name]), name  # not an upcast of bf16
        elif name.startswith("vision_tower"):
            assert p.dtype == torch.bfloat16


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_bf16_frozen_weights_under_autocast_train_like_float32(strategy):
    """The CUDA recipe's dtype plumbing, run on CPU: bf16 frozen weights, float32 trainable ones, bf16
    autocast, every fast path on. The loss is float32's within bf16 noise; trainable grads are float32."""
    cfg_lora = strategies.LoraParams(r=4, alpha=8, dropout=0.0)
    rows = samples()
    ref_model = tiny_model()
    ref_model = strategies.stage2(ref_model, strategy, cfg_lora)
    ref_loss, _ = loss_and_grads(ref_model, PadCollator(0)(rows))

    model = strategies.stage2(tiny_model(), strategy, cfg_lora)
    fast.split_precision(model, {})
    fast.lora_inputs_as_is(model)
    fast.set_fast_paths(model, Levers(towers_no_grad=True, upsample_matmul=True, fused_mining=True, mining_matmul=True,
                                      loss_impl="chunked"))
    fast.cast_pixels(type("D", (), {"samples": rows})())
    batch = PadCollator(0, dedup_images=True)(rows)
    assert batch["pixel_values"].dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batch)
    assert abs(float(loss) - float(ref_loss)) < 0.03 * float(ref_loss)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(grads) == trainable
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_set_fast_paths_refuses_trainable_towers():
    model = tiny_model()
    strategies.set_trainable(model, ("vision_tower",))
    with pytest.raises(SystemExit):
        fast.set_fast_paths(model, Levers(towers_no_grad=True))


# ---------------------------------------------------------------- sampler, config

def test_image_grouped_sampler_keeps_an_images_rows_together():
    keys = [0, 1, 1, 1, 4, 4, 6, 7, 7, 7]
    s = fast.ImageGroupedSampler(keys, seed=3)
    order = list(s)
    assert sorted(order) == list(range(len(keys)))
    runs = [keys[i] for i in order]
    seen = []
    for k in runs:  # each key appears in one contiguous run
        if not seen or seen[-1] != k:
            assert k not in seen
            seen.append(k)
    assert list(fast.ImageGroupedSampler(keys, seed=3)) == order
    s.set_epoch(1)
    assert list(s) != order


def test_image_keys_follow_shared_pixel_tensors():
    ds = type("D", (), {"samples": samples()})()
    assert fast.image_keys(ds) == [0, 1, 1, 1, 4, 4]


def test_levers_are_off_on_cpu_and_from_params_on_cuda(monkeypatch):
    from vlmlab.params import load

    from pathlib import Path
    train = load(Path(__file__).resolve().parents[1] / "params.yaml")["train"]
    run = {"data": "raw", "strategy": "full", "lr": 1e-3}
    cfg = recipe.TrainConfig.from_params(train, run, seed=0)
    assert cfg.levers.frozen_bf16 and cfg.levers.loss_impl == "chunked"  # params.yaml: the fast path by default
    monkeypatch.setattr(recipe, "on_gpu", lambda: False)
    assert recipe.levers_in_effect(cfg) == Levers()
    assert not recipe.levers_in_effect(cfg).any
    monkeypatch.setattr(recipe, "on_gpu", lambda: True)
    assert recipe.levers_in_effect(cfg) == cfg.levers
    ds = recipe.TrainConfig.from_params({**train, "deepspeed": "configs/deepspeed/zero2.json"}, run, seed=0)
    assert not recipe.levers_in_effect(ds).frozen_bf16  # DeepSpeed's bf16 mode keeps its own masters


def test_cpu_training_arguments_are_transformers_defaults(tmp_path, monkeypatch):
    """On CPU no lever touches the Trainer: the optimizer and NaN filter are transformers' defaults."""
    from transformers import TrainingArguments

    from vlmlab.params import load
    from pathlib import Path
    train = load(Path(__file__).resolve().parents[1] / "params.yaml")["train"]
    cfg = recipe.TrainConfig.from_params(train, {"data": "raw", "strategy": "full", "lr": 1e-3}, seed=0)
    monkeypatch.setattr(recipe, "on_gpu", lambda: False)
    args = recipe.training_args(cfg.stage1, cfg, tmp_path)
    default = TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert args.optim == default.optim and args.logging_nan_inf_filter == default.logging_nan_inf_filter
    assert args.dataloader_num_workers == train["workers"]


# ---------------------------------------------------------------- the CUDA recipe through the Trainer, on CPU

class RowSet(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.samples = rows

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


@pytest.mark.parametrize("mode", ["stage1", "full", "lora"])
def test_cuda_levers_through_the_trainer_under_cpu_bf16_autocast(mode, tmp_path, monkeypatch):
    """prepare_data + prepare_stage + run_stage with the CUDA levers (all but Liger and workers), the
    Trainer in bf16 autocast on CPU: the steps run, token counts kept on the device add up, what trains
    is float32 and the rest bf16, and the loss curve stays within bf16 noise of the float32 one."""
    import transformers

    from vlmlab.params import load
    from pathlib import Path
    train = load(Path(__file__).resolve().parents[1] / "params.yaml")["train"]
    train = {**train, "stage1_global_batch": 4, "stage1_micro_batch": 4, "stage2_global_batch": 4,
             "stage2_micro_batch": 4, "save_steps": 0, "liger_kernels": False, "cuda_workers": 0}
    run = {"data": "raw", "strategy": "lora" if mode == "lora" else "full", "lr": 1e-3, "lora_r": 4,
           "lora_alpha": 8, "lora_dropout": 0.0}
    stage = 1 if mode == "stage1" else 2

    def train_once(levers_on: bool):
        cfg = recipe.TrainConfig.from_params(train, run, seed=0)
        if levers_on:
            monkeypatch.setattr(recipe, "levers_in_effect", lambda c: c.levers)

            class BF16Args(transformers.TrainingArguments):  # CPU autocast, as bf16=True gives on CUDA
                def __init__(self, *a, **kw):
                    super().__init__(*a, **{**kw, "bf16": True})
            monkeypatch.setattr(transformers, "TrainingArguments", BF16Args)
        data = RowSet(samples(n_images=4, per_image=(3, 3, 3, 3)))
        recipe.prepare_data(cfg, data)
        model = recipe.prepare_stage(tiny_model(), stage, cfg, {})
        trainer, fig, curve = recipe.run_stage(model, data, recipe.make_collator(0, cfg),
                                               cfg.stage1 if stage == 1 else cfg.stage2, cfg,
                                               tmp_path / f"run{levers_on}", stage=stage)
        monkeypatch.undo()
        return model, trainer, fig, curve, data

    _, _, _, ref_curve, _ = train_once(False)
    model, trainer, fig, curve, data = train_once(True)
    assert len(curve) == len(ref_curve) == 3
    for a, b in zip(curve, ref_curve):
        assert abs(a["loss"] - b["loss"]) < 0.03 * b["loss"], (curve, ref_curve)
    assert trainer.state.num_input_tokens_seen == sum(len(s["input_ids"]) for s in data.samples)  # padding not counted
    assert fig["samples_per_s"] > 0 and all("step_s" in r for r in curve)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert data.samples[0]["pixel_values"].dtype == torch.bfloat16
    assert fast.mgm_of(model).fast == FastPaths(towers_no_grad=True, upsample_matmul=True, fused_mining=True,
                                                mining_matmul=train["mining_matmul"], loss="chunked")
