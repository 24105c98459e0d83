"""vlmlab.infer: base / LoRA adapter loading, single and batched answers, one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image

from vlmlab import infer
from vlmlab.io import StageError, read_jsonl
from vlmlab.models import presets
from vlmlab.sim.lm_tokenizer import train_world_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["what does the sign say ?", "the sign says hello .", "a red circle on the left ."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    model, processor = presets.build("tiny", train_world_tokenizer(TEXTS))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    base = root / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            modules_to_save=["mm_projector"]))
    adapter = root / "adapter"
    lora.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (96, 96), color).save(root / f"img{i}.jpg")
    return root, base, adapter, lora.eval()


def test_load_base_and_adapter(folders):
    root, base, adapter, lora = folders
    model, processor = infer.load_model(base)
    assert type(model).__name__ == "MgmForConditionalGeneration"
    with_adapter, _ = infer.load_model(adapter)
    batch = processor.pad([processor.encode_prompt("what ?", Image.open(root / "img0.jpg"))])
    with torch.no_grad():
        a, b, c = model(**batch).logits, with_adapter(**batch).logits, lora(**batch).logits
    assert torch.allclose(b, c, atol=1e-5)      # the adapter loaded is the adapter saved
    assert not torch.allclose(a, b, atol=1e-3)  # ... and it changes the model


def test_batched_answers_equal_single_answers(folders, tmp_path):
    root, base, _, _ = folders
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "image": str(root / f"img{i}.jpg"), "text": t}) + "\n"
                         for i, t in enumerate(["what does the sign say ?", "what ?", "the sign says"])))
    infer.main(str(base), questions=str(q), out=str(tmp_path / "a.jsonl"), batch_size=3, max_new_tokens=5)
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert [r["question_id"] for r in rows] == [0, 1, 2]
    model, processor = infer.load_model(base)
    for i, r in enumerate(rows):
        one = infer.generate_batch(model, processor, [{"question": r["prompt"], "image": Image.open(root / f"img{i}.jpg")}],
                                   max_new_tokens=5)
        assert one == [r["text"]]


def test_sampling_is_seeded(folders, capsys):
    root, base, _, _ = folders
    kw = dict(image=str(root / "img0.jpg"), question="what ?", do_sample=True, temperature=2.0, max_new_tokens=8)
    outs = []
    for seed in (1, 1, 2, 3, 4):
        infer.main(str(base), seed=seed, **kw)
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    assert len(set(outs)) > 1, "sampling should vary with the seed"


def test_bad_inputs_give_one_clear_line(folders, tmp_path):
    root, base, adapter, _ = folders
    with pytest.raises(StageError, match="no such image file"):
        infer.main(str(base), image=str(root / "nope.jpg"), question="what ?")
    with pytest.raises(StageError, match="no such model folder"):
        infer.main(str(tmp_path / "nomodel"), image=str(root / "img0.jpg"), question="what ?")
    # an adapter whose base is gone
    lost = tmp_path / "lost"
    lost.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (lost / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path="models/absent")))
    with pytest.raises(StageError, match="base_model_name_or_path"):
        infer.load_model(lost)
    # an adapter made for another model (LoRA shapes do not fit this base)
    other, _ = presets.build("tiny", train_world_tokenizer(TEXTS), text_config={
        **presets.PRESETS["tiny"]["text_config"], "hidden_size": 64, "intermediate_size": 128})
    wrong = tmp_path / "wrong"
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path=str(base))))
    with pytest.raises(StageError, match="cannot load this model/adapter") as err:
        infer.load_model(wrong)
    assert "\n" not in str(err.value)


def test_cli_writes_answers_and_rejects(folders, tmp_path):
    root, base, _, _ = folders
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 7, "image": "img0.jpg", "text": "what ?"}) + "\n"
                 + json.dumps({"question_id": 8, "image": "gone.jpg", "text": "what ?"}) + "\n"
                 + "[1, 2]\n" + "{not json\n")
    run = subprocess.run([sys.executable, "-m", "vlmlab.infer", "--model", str(base), "--questions", str(q),
                          "--image_root", str(root), "--out", str(tmp_path / "a.jsonl"), "--max_new_tokens", "3"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-1500:]
    assert [r["question_id"] for r in read_jsonl(tmp_path / "a.jsonl")] == [7]
    assert sorted(r["reason"] for r in read_jsonl(tmp_path / "a.jsonl.rejects.jsonl")) == \
        ["bad_json", "bad_schema", "missing_image"]
    bad = subprocess.run([sys.executable, "-m", "vlmlab.infer", "--model", str(base), "--image", "x.jpg",
                          "--question", "what ?"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1] == "error: x.jpg: no such image file"
