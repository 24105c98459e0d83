"""Synthesis end to end: a rendered recipe, Data-Juicer's executor running our fast_image_captioning_mapper
(the default synth.captioner_op) and the stock filters, a real tiny BLIP-2."""
import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml

from vlmlab.data.validate import check_image, check_line
from vlmlab.io import StageError, read_jsonl
from vlmlab.synth import recipe as R
from vlmlab.sim import teacher as T
from vlmlab.synth import captioner as C
from vlmlab.synth.run import InstallBlocked, allow_custom_op_reload, no_runtime_installs, synthesize
from vlmlab.sim.text import world_words
from conftest import simulate_raw

N_RAW = 48
TINY = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, qformer_hidden=32, qformer_layers=1,
            num_query_tokens=4, hidden=32, layers=1, heads=2, batch_size=16, lr=3e-3, epochs=3, max_words=40, encoder_images=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 48-image seed set (one image cut short, one missing), its world sets, and a quickly trained teacher."""
    root = tmp_path_factory.mktemp("synth")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["world"].update(raw_size=N_RAW, curated_size=96, instruct_size=1, eval_textvqa=1, eval_caption=2,
                           eval_mmbench=1, workers=1)
    simulate_raw(root, params)
    rows = read_jsonl(root / "raw" / "dj.jsonl")
    truncated = root / "raw" / rows[5]["images"][0]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (root / "raw" / rows[7]["images"][0]).unlink()

    torch.manual_seed(0)
    images, captions, _ = C.read_caption_set(root / "world" / "curated")
    cfg = T.TeacherConfig(**TINY)
    model, processor = T.build_teacher(cfg, world_words())
    T.train_teacher(model, processor, images, captions, cfg, seed=0)
    T.save_teacher(model, processor, root / "teacher")
    return root


def recipe_for(root: Path, **overrides) -> Path:
    cfg = R.SynthConfig(np=1, gpu_batch_size=16, batch_size=32, min_words=4, **overrides)
    rendered = R.render_recipe(cfg, captioner=str(root / "teacher"), dataset_path=str(root / "work/input.jsonl"),
                               export_path=str(root / "work/dj/export/dj.jsonl"), work_dir=str(root / "work/dj"))
    return R.write_recipe(rendered, root / f"recipe{len(overrides)}.yaml", seed=3)


@pytest.fixture(scope="module")
def run(setup):
    before = {d.metadata["Name"]: d.version for d in metadata.distributions()}
    metrics = synthesize(setup / "raw", recipe_for(setup), setup / "enhanced", setup / "work", seed=3)
    after = {d.metadata["Name"]: d.version for d in metadata.distributions()}
    return setup, metrics, before, after


def test_recipe_is_a_plain_data_juicer_config(setup, tmp_path):
    from data_juicer.config import init_configs

    for op, name in R.CAPTIONER_OPS.items():
        recipe = recipe_for(setup, captioner_op=op)
        allow_custom_op_reload(recipe)
        cfg = init_configs(args=["--config", str(recipe), "--work_dir", str(tmp_path)])
        names = [next(iter(op)) for op in cfg.process]
        assert names[0] == name and "text_length_filter" in names
        assert cfg.process[0][name]["caption_num"] == 3
        # ours comes through Data-Juicer's custom-operator mechanism, named by a path relative to the repo
        assert cfg.custom_operator_paths == (["vlmlab/synth/ops/fast_image_captioning_mapper.py"] if op == "fast" else None)


def test_captioner_op_is_checked():
    with pytest.raises(StageError, match="captioner_op='slow'"):
        R.SynthConfig.from_params({"captioner_op": "slow"})


def test_counts_add_up_and_bad_images_are_counted_rejects(run):
    root, m, _, _ = run
    assert m["samples_in"] == N_RAW and m["seed_rejects"] == 2
    ops = m["ops"]
    mapper = ops["fast_image_captioning_mapper"]  # the default captioner_op, through Data-Juicer's executor
    assert mapper["in"] == N_RAW - 2 and mapper["out"] == 3 * mapper["in"]  # 3 captions each, originals dropped
    # every op of the recipe reported its count (read off Data-Juicer's log), in the recipe's order
    recipe_ops = [next(iter(op)) for op in yaml.safe_load(recipe_for(root).read_text())["process"]]
    assert list(ops) == recipe_ops
    # what the last op kept is what Data-Juicer exported (the export file, not the log)
    assert m["samples_out"] == ops[recipe_ops[-1]]["out"] - m["format_rejects"]
    rejects = read_jsonl(root / "enhanced" / "rejects.jsonl")
    reasons = [r["reason"] for r in rejects]
    assert reasons.count("truncated_image") == 1 and reasons.count("missing_image") == 1
    for name in recipe_ops[1:]:  # each sample a filter dropped is one rejects row under its name
        assert reasons.count(name) == ops[name]["dropped"], name
    assert len(rejects) == 2 + sum(c.get("dropped", 0) for c in ops.values()) + m["format_rejects"]


def test_output_is_in_the_seed_format_and_passes_the_importer(run):
    root, m, _, _ = run
    rows = read_jsonl(root / "enhanced" / "dj.jsonl")
    assert len(rows) == m["samples_out"] > 0
    for r in rows:
        assert r["text"].startswith("<__dj__image>\n") and r["text"].endswith(" <|__dj__eoc|>")
        assert r["images"][0].startswith("images/") and (root / "enhanced" / r["images"][0]).is_file()
    # the importer's own checks, line by line (import_seed itself links each image once per row, and the
    # enhanced set has caption_num rows per image)
    seen = set()
    with open(root / "enhanced" / "dj.jsonl", "rb") as f:
        problems = [check_line(raw.rstrip(b"\n"), seen)[1] for raw in f]
    problems += [check_image(root / "enhanced", r["images"][0]) for r in rows]
    assert not any(problems), [p for p in problems if p][:3]
    llava = json.loads((root / "enhanced" / "llava.json").read_text())
    assert [r["id"] for r in llava] == [r["id"] for r in rows] and len({r["id"] for r in rows}) == len(rows)
    trace = read_jsonl(root / "enhanced" / "trace_sample.jsonl")
    assert trace and trace[0]["op"] == "fast_image_captioning_mapper" and 1 <= len(trace[0]["processed_texts"]) <= 3
    # nothing names where the checkout lies: data/enhanced must hash the same in any clone
    assert str(root) not in (root / "enhanced" / "trace_sample.jsonl").read_text()
    assert all(im.startswith("images/") for r in trace for im in r.get("images", []))


def test_no_package_was_installed_during_the_run(run):
    _, _, before, after = run
    assert before == after


def test_run_time_installs_are_refused(setup):
    from data_juicer.utils.lazy_loader import LazyLoader

    with no_runtime_installs(), pytest.raises(InstallBlocked, match="pin it in requirements.txt"):
        LazyLoader("surely_not_installed_pkg")._load()
    # an op whose package is missing (imagededup) fails at op set-up, before any captioning
    with pytest.raises(InstallBlocked, match="imagededup"):
        synthesize(setup / "raw", recipe_for(setup, dedup_method="phash"), setup / "dedup", setup / "work_dedup", 3)
    assert not (setup / "dedup").exists()


def test_broken_captioner_path_is_one_clear_error(setup, tmp_path):
    rendered = R.render_recipe(R.SynthConfig(), captioner=str(tmp_path / "missing"), dataset_path="x.jsonl",
                               export_path="y.jsonl", work_dir=str(tmp_path / "w"))
    recipe = R.write_recipe(rendered, tmp_path / "r.yaml", seed=0)
    with pytest.raises(StageError, match="not a local model folder"):
        synthesize(setup / "raw", recipe, tmp_path / "out", tmp_path / "work", 0)
    assert not (tmp_path / "out").exists()
