"""Real-data import: the fixture's 30 accepted rows, one case per bad-input kind, unusable inputs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_bomb_png
from vlmlab.data.validate import REASONS, import_seed
from vlmlab.io import StageError

REPO = Path(__file__).resolve().parents[1]
JSONL = "mgm_pretrain_stage_1_10k.head300.jsonl"
ACCEPTED_ALLAVA = {f"ALLaVA-4V/allava_laion/images/{n}.jpeg" for n in (24529, 77973, 48153)}


def test_fixture_accepts_exactly_the_30_rows_with_images(fixtures_dir, tmp_path):
    src = fixtures_dir / "better_synth"
    counts = import_seed(src, JSONL, "stage_1.subset.json", tmp_path / "raw", seed=0)
    assert counts["lines"] == 304 and counts["samples"] == 30
    assert counts["rejects"]["missing_image"] == 274 and counts["rejects"]["total"] == 274
    assert counts["prompts_restored"] == 30 and counts["prompts_from_pool"] == 0
    rows = [json.loads(line) for line in open(tmp_path / "raw/dj.jsonl", encoding="utf-8")]
    original = (src / JSONL).read_text(encoding="utf-8").splitlines()
    kept = [json.loads(line) for n, line in enumerate(original, 1) if n <= 27 or n in (301, 302, 304)]
    assert rows == kept
    assert {r["images"][0] for r in rows if r["images"][0].startswith("ALLaVA")} == ACCEPTED_ALLAVA
    for r in rows:   # images kept at the same relative paths, same bytes
        assert (tmp_path / "raw" / r["images"][0]).read_bytes() == (src / r["images"][0]).read_bytes()
    rejects = [json.loads(line) for line in open(tmp_path / "raw/rejects.jsonl")]
    assert {r["line"] for r in rejects} == set(range(28, 301)) | {303}
    assert all(str(src) not in r["detail"] for r in rejects)   # rejects do not depend on where data lies
    stage1 = json.loads((src / "stage_1.subset.json").read_text(encoding="utf-8"))
    by_id = {s["id"]: s for s in stage1}
    assert json.loads((tmp_path / "raw/llava.json").read_text()) == [by_id[r["id"]] for r in rows]


@pytest.fixture()
def bad_folder(fixtures_dir, tmp_path):
    """One line per bad-input kind (plus two good ones), with a real JPEG to break."""
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    good = (fixtures_dir / "better_synth/images/00609/006092514.jpg").read_bytes()
    (src / "images/good.jpg").write_bytes(good)
    (src / "images/good2.jpg").write_bytes(good)
    (src / "images/cut.jpg").write_bytes(good[: len(good) // 2])
    (src / "images/text.jpg").write_bytes(b"this is not an image")
    write_bomb_png(src / "images/bomb.png")

    def line(i, text="<__dj__image>\na cat <|__dj__eoc|>", image="images/good.jpg"):
        return json.dumps({"id": i, "text": text, "images": [image]}).encode()

    lines = [
        line("1"),                                                   # ok
        b'{"id": "3", "text": "<__dj__image>\\ncaf\xe9 <|__dj__eoc|>", "images": ["images/good.jpg"]}',  # non_utf8
        b'{"id": "2", "text": "<__dj__image>\\na cat <|__dj__eoc|>", ',  # bad_json
        json.dumps({"id": "4", "text": "<__dj__image>\nx <|__dj__eoc|>"}).encode(),   # bad_schema
        line("1", image="images/good2.jpg"),                         # duplicate_id
        line("6", text="a cat <|__dj__eoc|>"),                       # missing_image_token
        line("7", text="<__dj__image>\na cat"),                      # missing_eoc_token
        line("8", text="<__dj__image>\n <|__dj__eoc|>"),             # empty_caption
        line("9", image="../outside.jpg"),                           # bad_image_path
        line("10", image="images/nope.jpg"),                         # missing_image
        line("11", image="images/text.jpg"),                         # unreadable_image
        line("12", image="images/cut.jpg"),                          # truncated_image
        line("14", image="images/bomb.png"),                         # image_too_large (20000 x 20000)
        b"",                                                         # blank lines are skipped
        line("13", text="<__dj__image> a dog\n <|__dj__eoc|>", image="images/good2.jpg"),  # ok, recaptioned layout
    ]
    (src / "seed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return src


def test_each_bad_input_becomes_a_reject_with_its_reason(bad_folder, tmp_path):
    counts = import_seed(bad_folder, "seed.jsonl", "stage_1.json", tmp_path / "raw", seed=0)
    rejects = [json.loads(line) for line in open(tmp_path / "raw/rejects.jsonl")]
    assert [r["reason"] for r in rejects] == list(REASONS)
    assert [r["line"] for r in rejects] == list(range(2, 14))
    assert counts["samples"] == 2 and counts["lines"] == 14
    assert counts["rejects"] == {**dict.fromkeys(REASONS, 1), "total": len(REASONS)}
    assert counts["prompts_from_pool"] == 2   # no stage_1.json there
    assert sorted(p.name for p in (tmp_path / "raw/images").iterdir()) == ["good.jpg", "good2.jpg"]
    llava = json.loads((tmp_path / "raw/llava.json").read_text())
    assert [r["conversations"][1]["value"] for r in llava] == ["a cat", "a dog"]


@pytest.mark.parametrize("case", ["no_folder", "no_jsonl", "nothing_valid", "bad_stage1"])
def test_unusable_input_stops_with_one_clear_line(case, bad_folder, tmp_path):
    src, name, stage1 = bad_folder, "seed.jsonl", "stage_1.json"
    if case == "no_folder":
        src = tmp_path / "absent"
    elif case == "no_jsonl":
        name = "other.jsonl"
    elif case == "nothing_valid":
        (src / "seed.jsonl").write_text('{"id": 1, "text": "x", "images": ["a.jpg"]}\nnot json\n')
    else:
        (src / "stage_1.json").write_text("{broken")
    with pytest.raises(StageError) as e:
        import_seed(src, name, stage1, tmp_path / "raw", seed=0)
    assert e.value.message.startswith("error: ") and "\n" not in e.value.message
    assert {"no_folder": "no such folder", "no_jsonl": "no such file", "nothing_valid": "0 of 2 lines",
            "bad_stage1": "not a LLaVA json"}[case] in e.value.message


def run_prepare(tmp_path, data):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["world"].update(raw_size=8, curated_size=4, instruct_size=4, eval_textvqa=4, eval_caption=2, eval_mmbench=2)
    params["data"].update(data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "stages/prepare.py"), "--out_raw", str(out / "raw"),
                           "--out_world", str(out / "world"), "--metrics", str(out / "prepare.json"),
                           "--params", str(tmp_path / "params.yaml")], capture_output=True, text=True, cwd=REPO)
    return proc, out


def test_prepare_stage_imports_a_real_folder(fixtures_dir, tmp_path):
    proc, out = run_prepare(tmp_path, {"source": "path", "path": str(fixtures_dir / "better_synth"),
                                       "jsonl": JSONL, "stage1_json": "stage_1.subset.json"})
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "prepare.json").read_text())
    assert metrics["raw"]["samples"] == 30 and metrics["raw"]["rejects"]["missing_image"] == 274
    assert metrics["world"]["curated"] == 4 and (out / "world/eval/mmbench.tsv").is_file()


def test_prepare_stage_fails_cleanly_and_leaves_nothing(tmp_path):
    proc, out = run_prepare(tmp_path, {"source": "path", "path": str(tmp_path / "absent")})
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "no such folder" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_importing_the_worlds_challenge_layout_folder_keeps_its_bytes(tmp_path):
    """The simulator's seed folder is the challenge's: the importer takes every sample, restores every
    prompt from its stage_1.json, and writes back the very bytes the folder holds."""
    from vlmlab.sim.world import SEED_JSONL, SEED_PROMPTS, build_world
    params = {"seed": 1, "world": {"raw_size": 12, "curated_size": 2, "instruct_size": 2, "eval_textvqa": 2,
                                   "eval_caption": 2, "eval_mmbench": 2, "workers": 1}}
    seed = tmp_path / "pretrain_stage_1_10k"
    build_world(seed, tmp_path / "world", params)
    assert sorted(p.name for p in seed.iterdir()) == sorted(["images", SEED_JSONL, SEED_PROMPTS])
    counts = import_seed(seed, SEED_JSONL, SEED_PROMPTS, tmp_path / "raw", seed=0, workers=1)
    assert counts["samples"] == 12 and counts["prompts_restored"] == 12 and counts["rejects"]["total"] == 0
    raw = tmp_path / "raw"
    assert (raw / "dj.jsonl").read_bytes() == (seed / SEED_JSONL).read_bytes()
    assert (raw / "llava.json").read_bytes() == (seed / SEED_PROMPTS).read_bytes()
    assert (raw / "rejects.jsonl").read_bytes() == b""
    assert (raw / "images/00000/000000011.jpg").read_bytes() == (seed / "images/00000/000000011.jpg").read_bytes()


def test_prepare_stage_runs_the_world_through_the_importer(tmp_path):
    """data.source=world: the stage writes the challenge layout and imports it (the importer's counts
    are in the metrics), and the temporary seed folder is gone."""
    proc, out = run_prepare(tmp_path, {"source": "world"})
    assert proc.returncode == 0, proc.stderr
    raw = json.loads((out / "prepare.json").read_text())["raw"]
    assert raw["samples"] == raw["lines"] == raw["prompts_restored"] == 8 and raw["rejects"]["total"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["prepare.json", "raw", "world"]
    assert sorted(p.name for p in (out / "raw").iterdir()) == ["dj.jsonl", "images", "llava.json", "rejects.jsonl"]


def test_rows_sharing_an_image_import_once(tmp_path, monkeypatch):
    """The enhanced set has 3 captions per image: the importer links each image once."""
    from PIL import Image

    from vlmlab.data import validate

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    rows = []
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (8, 8), colour).save(src / "images" / f"{name}.jpg")
        rows += [{"id": f"{name}_{k}", "text": f"<__dj__image>\na {colour} square number {k} <|__dj__eoc|>",
                  "images": [f"images/{name}.jpg"]} for k in range(3)]
    (src / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    real = validate.link_or_copy
    monkeypatch.setattr(validate, "link_or_copy", lambda s, d: (calls.append(d.relative_to(tmp_path / "out").as_posix()),
                                                                  real(s, d)))
    counts = import_seed(src, "set.jsonl", "", tmp_path / "out", seed=0, workers=1)
    assert counts["samples"] == 6 and counts["rejects"]["total"] == 0
    assert calls == ["images/a.jpg", "images/b.jpg"]   # one link/copy per image, not per row
    assert (tmp_path / "out" / "images" / "a.jpg").is_file() and (tmp_path / "out" / "images" / "b.jpg").is_file()
