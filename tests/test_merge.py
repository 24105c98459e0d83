"""Merge: the folded model computes what base + adapter computed; a corrupted adapter fails the stage."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from vlmlab import io
from vlmlab.models import presets
from vlmlab.sim.lm_tokenizer import train_world_tokenizer
from vlmlab.train import merge, strategies

TEXTS = ["a small red circle on the left .", "a large blue square in the middle .", "describe the image .",
         "what does the sign say ?", "the sign says hello ."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base folder, adapter folder, held-out captions jsonl): a LoRA run whose adapter is not a no-op."""
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    model, processor = presets.build("tiny", train_world_tokenizer(TEXTS))
    model.save_pretrained(root / "zoo")
    processor.save_pretrained(root / "zoo")
    peft_model = strategies.stage2(model, "lora", strategies.LoraParams(r=4, alpha=8, dropout=0.0),
                                   base_path=str(root / "zoo"))
    with torch.no_grad():  # as if trained: LoRA B starts at zero, the connector copies at the base's values
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(root / "adapter")
    processor.save_pretrained(root / "adapter")
    g = torch.Generator().manual_seed(1)
    (root / "eval/images").mkdir(parents=True)
    rows = []
    for i in range(5):
        Image.fromarray((torch.rand(96, 96, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"eval/images/{i}.jpg")
        rows.append({"id": str(i), "image": f"images/{i}.jpg", "captions": [TEXTS[i]] * 5})
    (root / "eval/captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, processor


def batches(root, processor):
    return merge.held_out_batches(root / "eval/captions.jsonl", processor, n=5, batch_size=2)


def test_merged_model_matches_adapter_and_loads_without_peft(trained, tmp_path):
    root, processor = trained
    figures = merge.merge_and_check(root / "adapter", tmp_path / "merged", batches(root, processor), tolerance=1e-4,
                                    processor=processor)
    assert figures["max_logit_diff"] < 1e-4 and figures["max_logit_diff_saved"] < 1e-4 and figures["samples"] == 5 and figures["positions"] > 5 * 16
    assert not (tmp_path / "merged/adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    # the adapter really changed the model: merged differs from the base it came from
    base = AutoModelForImageTextToText.from_pretrained(root / "zoo")
    ref, out = merge.logits_on(base, batches(root, processor)), merge.logits_on(merged, batches(root, processor))
    assert merge.max_abs_diff(ref, out) > 1e-2


def test_corrupted_adapter_fails_and_leaves_no_output(trained, tmp_path):
    root, processor = trained
    bad = tmp_path / "adapter"
    bad.mkdir()
    for f in (root / "adapter").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = float("nan")  # one poisoned value, as a bad write or bit rot would leave
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(io.StageError) as e:
        merge.merge_and_check(bad, tmp_path / "merged", batches(root, processor), tolerance=1e-3,
                              base_dir=root / "zoo")
    assert "disagrees" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "merged").exists()


def test_tolerance_check_catches_a_wrong_fold(trained):
    root, processor = trained
    model, _ = merge.load_adapter_model(root / "adapter")
    ref = merge.logits_on(model, batches(root, processor))
    merged = model.merge_and_unload()
    with torch.no_grad():  # a fold that got one layer slightly wrong
        merged.language_model.model.layers[0].self_attn.q_proj.weight.mul_(1.05)  # Gemma: 1% moved logits by 6e-5
    diff = merge.max_abs_diff(ref, merge.logits_on(merged, batches(root, processor)))
    assert diff > 1e-4
    with pytest.raises(io.StageError):
        merge.check_tolerance(diff, 1e-4, "adapter")
    merge.check_tolerance(0.5e-4, 1e-4, "adapter")  # within tolerance: passes


def test_not_an_adapter_folder_is_one_clear_line(trained, tmp_path):
    root, processor = trained
    with pytest.raises(io.StageError) as e:
        merge.merge_and_check(root / "zoo", tmp_path / "merged", batches(root, processor), tolerance=1e-3)
    assert "adapter_config.json" in str(e.value)


def test_a_bf16_save_is_checked_against_its_own_tolerance(trained, tmp_path):
    """GPU runs save bf16: the fold is still checked tightly, the rounded folder against saved_tolerance."""
    root, processor = trained
    with pytest.raises(io.StageError) as e:
        merge.merge_and_check(root / "adapter", tmp_path / "strict", batches(root, processor), tolerance=1e-4,
                              save_dtype=torch.bfloat16, saved_tolerance=1e-6)
    assert "saved as bfloat16" in str(e.value) and not (tmp_path / "strict").exists()
    figures = merge.merge_and_check(root / "adapter", tmp_path / "merged", batches(root, processor), tolerance=1e-4,
                                    save_dtype=torch.bfloat16, saved_tolerance=1.0)
    assert figures["max_logit_diff"] < 1e-4 < figures["max_logit_diff_saved"] < 1.0
    assert json.loads((tmp_path / "merged/config.json").read_text())["dtype"] == "bfloat16"


def test_no_usable_held_out_sample_is_one_clear_line(trained, tmp_path):
    """No sample to compare on would let any adapter pass: it stops the stage, as does merge.samples = 0."""
    root, processor = trained
    (tmp_path / "captions.jsonl").write_text((root / "eval/captions.jsonl").read_text())  # its images are not beside it
    for path, n in ((tmp_path / "captions.jsonl", 5), (root / "eval/captions.jsonl", 0)):
        with pytest.raises(io.StageError) as e:
            merge.held_out_batches(path, processor, n=n, batch_size=2)
        assert "no usable held-out sample" in str(e.value) and "\n" not in str(e.value)
    # a row without its image is skipped, the next rows make up the n
    rows = [json.loads(line) for line in (root / "eval/captions.jsonl").read_text().splitlines()]
    rows = [dict(rows[0], image="images/gone.jpg")] + [dict(r, image=str(root / "eval" / r["image"])) for r in rows]
    (tmp_path / "gap.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = merge.held_out_batches(tmp_path / "gap.jsonl", processor, n=3, batch_size=2)
    want = merge.held_out_batches(root / "eval/captions.jsonl", processor, n=3, batch_size=2)
    assert all(torch.equal(g[k], w[k]) for g, w in zip(got, want, strict=True) for k in w)
