"""The zoo stage's tiny components learn (held-out, vs. chance) and assemble into a loadable MGM."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForImageTextToText

from vlmlab.io import StageError
from vlmlab.models import local, presets
from vlmlab.sim import pretrain
from vlmlab.models.processor import MgmProcessor
from vlmlab.sim.lm_tokenizer import train_world_tokenizer
from vlmlab.sim import labels, text, vocab, world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world_tokenizer():
    texts = world.world_chat_corpus(2000, 0)  # the zoo's default corpus (zoo.lm_corpus: chats)
    return texts, train_world_tokenizer(texts, text.world_words())


def test_tokenizer_covers_world_text_without_unknowns(world_tokenizer):
    texts, tok = world_tokenizer
    unseen = world.world_text_corpus(300, 99)  # every kind of world text, not only chat rounds
    ids = [i for t in unseen for i in tok(t, add_special_tokens=False)["input_ids"]]
    assert tok.unk_token_id not in ids
    assert len(tok) < 1000  # word level: a closed, small vocabulary


def test_lm_beats_unigram_on_heldout_text(world_tokenizer):
    texts, tok = world_tokenizer
    cfg = presets.build_config("tiny", vocab_size=len(tok), image_token_id=4)
    _, m = pretrain.pretrain_lm(cfg.text_config, tok, texts, world.world_chat_corpus(200, 1),
                           pretrain.LoopConfig(steps=40, batch_size=32, lr=5e-3))
    assert m["heldout_ppl"] < 0.5 * m["unigram_ppl"], m
    assert 0 <= m["question_only_acc"] <= 1 and 0 <= m["context_answer_acc"] <= 1, m


def test_answer_weight_falls_on_the_model_turns_only(world_tokenizer):
    texts, tok = world_tokenizer
    two_rounds = texts[0] + tok.eos_token + texts[1]   # MGM's template joins rounds with <eos>
    ids = pretrain.encode_texts(tok, [two_rounds, texts[2]], 256)
    mask = pretrain.answer_mask(ids, tok)
    turn = f"{text.START_OF_TURN}model\n"
    for row, m, t in zip(ids, mask, [two_rounds, texts[2]]):
        answers = [a.split(text.END_OF_TURN)[0] + text.END_OF_TURN for a in t.split(turn)[1:]]
        want = [i for a in answers for i in tok(a, add_special_tokens=False)["input_ids"]]
        assert row[m].tolist() == want, tok.convert_ids_to_tokens(row[m])
    # weight 1 everywhere is the plain next-token loss
    cfg = presets.build_config("tiny", vocab_size=len(tok), image_token_id=4)
    torch.manual_seed(0)
    lm = pretrain.AutoModelForCausalLM.from_config(cfg.text_config)
    batch = pretrain._lm_batch(ids, tok.pad_token_id)
    weighted = pretrain._weighted_lm_loss(lm, batch, torch.ones(batch["input_ids"].shape))
    assert torch.allclose(weighted, lm(**batch).loss, rtol=1e-5)
    heavy = pretrain._weighted_lm_loss(lm, batch, 1 + 4 * mask[:, :batch["input_ids"].shape[1]].float())
    assert not torch.allclose(heavy, weighted)


def test_lm_chat_rounds_are_the_processors_template(world_tokenizer):
    # the LM learns the exact ids a VLM prompt + answer gets from MgmProcessor (template, <bos>, <eos>)
    texts, tok = world_tokenizer
    rounds = [t for t in texts if t.startswith(text.START_OF_TURN)]
    assert rounds == texts
    processor = MgmProcessor(copy.deepcopy(tok), 32, 96, 16)  # it adds <image> to the one it is given
    for t in rounds[:20]:
        question, answer = t.removeprefix(f"{text.START_OF_TURN}user\n").split(
            f"{text.END_OF_TURN}\n{text.START_OF_TURN}model\n")
        ids, _ = processor._encode_rounds([(question, answer.removesuffix(f"{text.END_OF_TURN}\n"))])
        assert pretrain.encode_texts(tok, [t], 256)[0][:len(ids)].tolist() == ids


@pytest.mark.parametrize("tower", ["vision_config", "vision_aux_config"])
def test_towers_beat_chance_on_heldout_scenes(tower):
    cfg = presets.build_config("tiny", vocab_size=64, image_token_id=4)
    size = cfg.image_size if tower == "vision_config" else cfg.image_size_aux
    keep = {"sign_side": 2, "count": 3}
    train = labels.labelled_images(1000, 0, size)
    val = labels.labelled_images(200, 1, size)
    pick = lambda d: (d[0], {k: d[1][k] for k in keep})  # noqa: E731
    _, m = pretrain.pretrain_tower(getattr(cfg, tower), cfg, keep, pick(train), pick(val),
                              pretrain.LoopConfig(steps=100, batch_size=32, lr=3e-3), tower)
    assert m["acc_sign_side"] > m["chance_sign_side"] + 0.3, m
    assert m["acc_count"] > m["chance_count"] + 0.15, m


def test_assembled_model_carries_the_pretrained_parts(world_tokenizer, tmp_path):
    _, tok = world_tokenizer
    model, processor = presets.build("tiny", tok)
    cfg = model.config
    lm = type(model.language_model)(cfg.text_config)
    vit = type(model.vision_tower)(cfg.vision_config)
    cnx = type(model.vision_tower_aux)(cfg.vision_aux_config)
    cnx.layernorm = torch.nn.Identity()
    base = pretrain.assemble(cfg, lm, vit, cnx)
    assert torch.equal(base.vision_tower_aux.encoder.stages[2].layers[0].pwconv1.weight,
                       cnx.encoder.stages[2].layers[0].pwconv1.weight)
    assert torch.equal(base.language_model.model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)


def run_zoo(tmp_path: Path, zoo: dict, name: str = "zoo"):
    """stages/zoo.py with params.yaml's `zoo:` updated by `zoo`: (process, out folder, metrics file)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["zoo"].update(zoo)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out, metrics = tmp_path / name, tmp_path / f"{name}.json"
    run = subprocess.run([sys.executable, str(REPO / "stages/zoo.py"), "--out", str(out), "--metrics", str(metrics),
                          "--monitor", str(tmp_path / f"mon/{name}"), "--params", str(tmp_path / "params.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    return run, out, metrics


def test_zoo_stage_end_to_end(tmp_path):
    small = dict(lm_texts=400, lm_heldout_texts=50, lm_steps=3, vit_images=64, vit_steps=2,
                 convnext_images=64, convnext_steps=2, heldout_images=32, tower_batch_size=16)
    run, out, metrics = run_zoo(tmp_path, small)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "mon/zoo.csv").is_file() and metrics.is_file()
    # the tiny parts went through the official MGM layout and the converter (zoo.local_mgm's path)
    result = json.loads(metrics.read_text())
    assert result["converted"]["mgm"]["missing"] == result["converted"]["mgm"]["unused"] == 0
    assert result["converted"]["mgm"]["loaded"] > 100 and result["lm"]["heldout_ppl"] > 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = MgmProcessor.from_pretrained(out)
    assert model.config.image_token_id == processor.image_token_id
    assert model.generation_config.eos_token_id == processor.stop_token_ids
    init_std = yaml.safe_load((REPO / "params.yaml").read_text())["zoo"]["lm_init_std"]
    assert model.config.text_config.initializer_range == init_std  # how the LM began
    # a bad source is one clear line and a non-zero exit
    bad, _, _ = run_zoo(tmp_path, dict(small, source="hub"), "x")
    assert bad.returncode != 0 and "zoo.source" in bad.stderr.strip().splitlines()[-1]


def test_the_lm_pretrained_beside_the_towers_gives_the_same_bits(tmp_path):
    """zoo.parallel: the LM in a spawned process while the towers train: every saved file as in one process."""
    small = dict(lm_texts=300, lm_heldout_texts=40, lm_steps=4, vit_images=48, vit_steps=2,
                 convnext_images=48, convnext_steps=2, heldout_images=16, tower_batch_size=16)
    runs = {parallel: run_zoo(tmp_path, dict(small, parallel=parallel), f"zoo_{parallel}") for parallel in (True, False)}
    for run, _, _ in runs.values():
        assert run.returncode == 0, run.stderr[-2000:]
    (_, par, par_metrics), (_, one, one_metrics) = runs[True], runs[False]
    names = sorted(f.name for f in par.iterdir())
    assert names == sorted(f.name for f in one.iterdir()) and "model.safetensors" in names
    assert all((par / n).read_bytes() == (one / n).read_bytes() for n in names)
    assert json.loads(par_metrics.read_text())["lm"] == json.loads(one_metrics.read_text())["lm"]


def test_random_source_is_the_preset_untrained(tmp_path):
    # zoo.source=random: the preset's shapes at random init with the world tokenizer (GPU speed runs of
    # mgm-2b on the tiny world); the tiny preset checks it here: nothing pretrained, everything loadable
    run, out, metrics = run_zoo(tmp_path, dict(source="random", lm_texts=400))
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(metrics.read_text())
    assert "lm" not in result and "converted" not in result  # nothing trained, nothing converted
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = MgmProcessor.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == result["params"]["total"]
    assert model.config.image_token_id == processor.image_token_id
    assert result["tokenizer"]["tokens"] == len(processor.tokenizer)
    ids = processor.tokenizer(world.world_text_corpus(20, 5)[0], add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids  # the world's text, as the train stage will feed it


def test_local_source_assembles_llm_clip_and_openclip_convnext(tmp_path):
    from transformers import CLIPVisionModel, GemmaForCausalLM

    from vlmlab.models import convert

    torch.manual_seed(0)
    ref, processor = presets.build("tiny", train_world_tokenizer(["a red circle ."]))
    cfg = ref.config
    GemmaForCausalLM(cfg.text_config).save_pretrained(tmp_path / "llm")
    llm_config = json.loads((tmp_path / "llm" / "config.json").read_text())
    (tmp_path / "llm" / "config.json").write_text(json.dumps(dict(llm_config, hidden_act="gelu")))  # gemma-2b-it's
    processor.tokenizer.save_pretrained(tmp_path / "llm")
    clip = CLIPVisionModel(cfg.vision_config)
    clip.save_pretrained(tmp_path / "clip")
    trunk = {"visual.trunk." + convert.ours_key_to_mgm("vision_tower_aux." + k)[len("model.vision_tower_aux.vision_"):]: v
             for k, v in ref.vision_tower_aux.state_dict().items()}
    trunk["visual.head.proj.weight"] = torch.zeros(4, 4)  # OpenCLIP's head: not part of MGM
    (tmp_path / "convnext").mkdir()
    torch.save(trunk, tmp_path / "convnext" / "open_clip_pytorch_model.bin")
    p = {"local_llm": str(tmp_path / "llm"), "local_vision": str(tmp_path / "clip"),
         "local_vision_aux": str(tmp_path / "convnext"), "local_image_size_aux": 96}
    model, proc, metrics = local.build_local(p, "sdpa")
    assert model.config.aux_grid == cfg.aux_grid and model.config.num_image_tokens == cfg.num_image_tokens
    assert model.config.text_config.hidden_act == "gelu_python"  # "gelu" ran as erf GELU in MGM-2B's transformers
    assert torch.equal(model.vision_tower_aux.encoder.stages[1].layers[0].dwconv.weight,
                       ref.vision_tower_aux.encoder.stages[1].layers[0].dwconv.weight)
    assert torch.equal(model.vision_tower.encoder.layers[0].mlp.fc1.weight, clip.encoder.layers[0].mlp.fc1.weight)
    batch = proc.pad([proc.encode_prompt("a red circle", Image.new("RGB", (96, 96), "red"))])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    with pytest.raises(StageError, match="zoo.local_vision_aux"):
        local.build_local(dict(p, local_vision_aux=str(tmp_path / "nowhere")), "sdpa")


def test_column_targets_describe_the_rendered_scenes():
    images, y = labels.labelled_scenes(40, 3, 32)
    ref_images, ref = labels.labelled_images(40, 3, 32)
    assert (images == ref_images).all() and (y["word"] == ref["word"]).all()
    present = sum((y[f"shape_{c}"] > 0).astype(int) for c in vocab.POSITIONS)
    assert (present == ref["count"] + 1).all()  # one object per occupied column
    assert set(y) == set(labels.tower_targets())


def test_answer_accuracies_with_and_without_the_description(world_tokenizer):
    # a stand-in LM that answers right exactly when a round's scene description is in its prompt
    texts, tok = world_tokenizer
    rounds = [t for t in texts if text.SHORT_ANSWER in t][:20]
    turn = f"{text.START_OF_TURN}model\n"
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    answer_of = {" ".join(map(str, ids(t.split("\n")[1]))): ids(t.split(turn)[1].split(text.END_OF_TURN)[0])[0]
                 for t in rounds}

    class ReadsContext(torch.nn.Module):
        def forward(self, input_ids):
            prompt = " " + " ".join(map(str, input_ids[0].tolist())) + " "
            logits = torch.zeros(1, input_ids.shape[1], len(tok))
            for description, answer in answer_of.items():
                if f" {description} " in prompt:
                    logits[0, -1, answer] = 1.0
            return type("Out", (), {"logits": logits})()

    m = pretrain.context_answer_accuracy(ReadsContext(), tok, rounds)
    assert m == {"context_answer_acc": 1.0, "question_only_acc": 0.0}
