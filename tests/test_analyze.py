"""EDA: exact counts on a hand-made set, the real fixture's quirks, deterministic stage outputs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlmlab.data.eda import analyze
from vlmlab.data.formats import dj_text
from vlmlab.data.validate import import_seed
from vlmlab.io import StageError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def small_set(fixtures_dir, tmp_path):
    """4 samples: a repeated caption, two byte-identical images under different names, 2 rejects."""
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    jpg = fixtures_dir / "better_synth/images/00609/006092514.jpg"
    other = fixtures_dir / "better_synth/images/00027/000270672.jpg"
    for name, src in (("a.jpg", jpg), ("b.jpg", jpg), ("c.jpg", other)):
        shutil.copyfile(src, root / "images" / name)
    caps = [("1", "a red Circle", "a.jpg"), ("2", "a red circle", "b.jpg"), ("3", "a red Circle", "c.jpg"),
            ("4", "sign", "c.jpg")]
    (root / "dj.jsonl").write_text("".join(json.dumps({"id": i, "text": dj_text(c), "images": [f"images/{p}"]}) + "\n"
                                           for i, c, p in caps))
    (root / "rejects.jsonl").write_text('{"line": 5, "id": "5", "reason": "missing_image", "detail": ""}\n'
                                        '{"line": 6, "id": "6", "reason": "bad_json", "detail": ""}\n')
    return root


def test_counts_on_a_hand_made_set(small_set):
    m = analyze(small_set).metrics
    assert m["samples"] == 4
    assert m["rejects"] == {"bad_json": 1, "missing_image": 1, "total": 2}
    assert m["caption_words"]["max"] == 3 and m["caption_words"]["min"] == 1 and m["caption_words"]["mean"] == 2.5
    assert m["caption_chars"]["max"] == 12 and m["caption_chars"]["min"] == 4
    assert m["vocab_size"] == 4                      # a, red, circle, sign (lower-cased)
    assert m["duplicate_captions"] == 1              # "a red Circle" twice, exact match only
    assert m["images"] == {**m["images"], "distinct_paths": 3, "duplicate_content": 1, "missing": 0}
    t = analyze(small_set, top_words=2).tables
    assert t["top_words"] == [{"word": "a", "count": 3}, {"word": "circle", "count": 3}]
    assert sum(r["samples"] for r in t["caption_words"]) == 4


def test_real_fixture_quirks(fixtures_dir, tmp_path):
    import_seed(fixtures_dir / "better_synth", "mgm_pretrain_stage_1_10k.head300.jsonl", "stage_1.subset.json",
                tmp_path / "raw", seed=0)
    a = analyze(tmp_path / "raw")
    m = a.metrics
    assert m["samples"] == 30 and m["rejects"] == {"missing_image": 274, "total": 274}
    assert m["caption_words"]["min"] == 1                     # Chinese ALLaVA captions: one whitespace token
    assert m["images"]["height"]["max"] == 1390 and m["images"]["width"]["min"] == 336
    assert {"size": "866x1390", "count": 1} in a.tables["image_sizes"]


def run_stage(data, out):
    return subprocess.run([sys.executable, str(REPO / "stages/analyze.py"), "--data", str(data), "--name", "t",
                           "--metrics", str(out / "m.json"), "--plots", str(out / "plots")],
                          capture_output=True, text=True, cwd=REPO)


def test_stage_outputs_are_byte_identical_across_runs(small_set, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_stage(small_set, a).returncode == 0
    assert run_stage(small_set, b).returncode == 0
    files = sorted(p.name for p in (a / "plots").iterdir())
    assert files == ["caption_chars.csv", "caption_words.csv", "image_sizes.csv", "overview.png", "rejects.csv",
                     "top_words.csv"]
    for name in files:
        assert (a / "plots" / name).read_bytes() == (b / "plots" / name).read_bytes(), name
    assert (a / "m.json").read_bytes() == (b / "m.json").read_bytes()
    assert (a / "plots/top_words.csv").read_text().splitlines()[:2] == ["word,count", "a,3"]


def test_empty_tables_are_written_as_their_header(tmp_path):
    """One row whose image is missing and whose text does not parse: image_sizes and top_words
    have no rows (write_csv once crashed on that with IndexError); each CSV is its header alone."""
    root = tmp_path / "set"
    root.mkdir()
    (root / "dj.jsonl").write_text(json.dumps({"id": "1", "text": "no tokens", "images": ["images/gone.jpg"]}) + "\n")
    proc = run_stage(root, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    plots = tmp_path / "out/plots"
    assert (plots / "image_sizes.csv").read_text() == "size,count\n"
    assert (plots / "top_words.csv").read_text() == "word,count\n"
    assert (plots / "rejects.csv").read_text() == "reason,count\nnone,0\n"   # no rejects.jsonl: the placeholder row
    assert (plots / "caption_words.csv").read_text() == "words,samples\n0,1\n"
    m = json.loads((tmp_path / "out/m.json").read_text())
    assert m["images"]["missing"] == 1 and m["unparsable_texts"] == 1 and m["vocab_size"] == 0


def test_missing_set_fails_with_one_line(tmp_path):
    with pytest.raises(StageError, match="dj.jsonl: no such file"):
        analyze(tmp_path)
