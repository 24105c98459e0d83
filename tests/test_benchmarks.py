"""The benchmark runners end to end on a tiny world eval set: a random tiny MGM runs through
every format, and an oracle (answers = ground truth) must get the top scores."""
import json

import pytest
import torch
import yaml

from vlmlab.evaluate import benchmarks
from vlmlab.evaluate.benchmarks import GenConfig, run_captions, run_mmbench, run_textvqa
from vlmlab.evaluate.textvqa import soft_score
from vlmlab.io import StageError
from vlmlab.models import presets
from vlmlab.models.mgm import MgmForConditionalGeneration
from vlmlab.models.processor import MgmProcessor
from vlmlab.sim.lm_tokenizer import train_world_tokenizer
from vlmlab.sim import text
from vlmlab.sim.world import build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    params = yaml.safe_load(open("params.yaml"))
    params["world"].update(raw_size=1, curated_size=1, instruct_size=1, eval_textvqa=6, eval_caption=4, eval_mmbench=3)
    build_world(None, out, params)
    return out / "eval"


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = train_world_tokenizer(text.corpus_words(), text.corpus_words())
    # the processor appends <image> after the vocabulary (as to Gemma's): id len(tok), outside the LM
    cfg = presets.build_config("tiny", vocab_size=len(tok), image_token_id=len(tok),
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    yield MgmForConditionalGeneration(cfg).eval(), MgmProcessor.for_model(tok, cfg)
    torch.set_num_threads(threads)


def test_random_model_runs_every_benchmark(world, tiny):
    model, proc = tiny
    cfg = GenConfig(batch_size=4, caption_max_new_tokens=6)
    rows, m = run_textvqa(model, proc, world / "textvqa_questions.jsonl", world / "textvqa_annotations.json", world, cfg)
    assert len(rows) == m["textvqa_questions"] == 6 and 0 <= m["textvqa_acc"] <= 1 and m["textvqa_by_type"]
    assert all(r["prompt"].endswith("Answer the question using a single word or phrase.") for r in rows)
    rows, m = run_captions(model, proc, world / "captions.jsonl", world, cfg)
    assert len(rows) == 4 and set(m) >= {"bleu_1", "bleu_4", "cider"}
    rows, m = run_mmbench(model, proc, world / "mmbench.tsv", cfg)
    assert m["mmbench_questions"] == 3 and m["mmbench_rows"] == 12  # 3 questions x 4 rotations
    assert m["mmbench_circular_acc"] <= m["mmbench_acc"]


def test_oracle_gets_top_scores(world, tiny, monkeypatch):
    model, proc = tiny
    ann = {a["image_id"]: a for a in json.load(open(world / "textvqa_annotations.json"))["data"]}
    refs = [json.loads(l) for l in open(world / "captions.jsonl")]

    seen = {}

    def oracle(model, processor, items, batch_size, max_new_tokens, **kw):
        seen.update(kw)
        out = []
        for it in items:
            name = str(it.get("image", ""))
            if "Answer the question" in it["prompt"]:
                out.append(ann[name.rsplit("/", 1)[-1][:-4]]["answers"][0].upper())  # case must not matter
            else:
                out.append(next(r["captions"][0] for r in refs if name.endswith(r["image"])))
        return out

    monkeypatch.setattr(benchmarks, "generate_answers", oracle)
    cfg = GenConfig(batch_size=16, prefix_batch=3)
    _, m = run_textvqa(model, proc, world / "textvqa_questions.jsonl", world / "textvqa_annotations.json", world, cfg)
    assert seen == {"cache": "dynamic", "compile": False, "prefix_batch": 3}  # the stage's params reach the decoder
    expected = sum(soft_score(a["answers"][0], a["answers"]) for a in ann.values()) / len(ann)
    assert m["textvqa_acc"] == pytest.approx(expected) and expected > 0.9
    _, m = run_captions(model, proc, world / "captions.jsonl", world, cfg)
    assert m["bleu_4"] > 0.5 and m["cider"] > 1.0

    def letters(model, processor, items, batch_size, max_new_tokens, **kw):
        return [f"({truth[i]})" for i in range(len(items))]

    from vlmlab.evaluate import mmbench, readers
    truth = [r["answer"] for r in mmbench.expand_rotations(readers.read_mmbench_tsv(world / "mmbench.tsv"))]
    monkeypatch.setattr(benchmarks, "generate_answers", letters)
    _, m = run_mmbench(model, proc, world / "mmbench.tsv", cfg)
    assert m["mmbench_acc"] == m["mmbench_circular_acc"] == 1.0 and m["mmbench_unparsed"] == 0


def test_missing_images_and_mismatched_files_fail_clearly(world, tiny, tmp_path):
    model, proc = tiny
    with pytest.raises(StageError, match="images missing under"):
        run_textvqa(model, proc, world / "textvqa_questions.jsonl", world / "textvqa_annotations.json", tmp_path, GenConfig(batch_size=16))
    other = tmp_path / "ann.json"
    other.write_text(json.dumps({"data": [{"image_id": "x", "question": "q?", "answers": ["a"] * 10}]}))
    with pytest.raises(StageError, match="has no annotation"):
        run_textvqa(model, proc, world / "textvqa_questions.jsonl", other, world, GenConfig(batch_size=16, limit=1, textvqa_max_new_tokens=1))
