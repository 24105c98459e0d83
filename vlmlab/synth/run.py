"""Run the synthesis recipe in-process with Data-Juicer's executor, and bring its output back to the seed format.

Around Data-Juicer 1.6.1 this module adds what a reproducible pipeline needs and the tool does not:
- no run-time installs: `LazyLoader._install_package` raises (Data-Juicer would pip/uv-install a missing
  package the moment an op imports it), so a missing dependency is a clear error, not a changed venv;
- the HF datasets cache lives in the stage's work folder (`ds_cache_dir`), not in ~/.cache;
- images are checked before the run: Data-Juicer's `skip_op_error` would drop a whole batch around one
  bad file, so a sample whose image does not decode becomes a counted reject instead;
- seeding: Data-Juicer has no seed option; `torch.manual_seed` (+ random, numpy) before the run makes
  `np: 1` runs identical (sampling happens in `model.generate`), and forked workers inherit the state;
- the output is normalised back to the seed layout: `<__dj__image>\\n<caption> <|__dj__eoc|>`
  (the op writes `<__dj__image> <caption>`), image paths relative to the output folder (the op
  writes absolute ones), unique ids (`<seed id>_<k>`; the op copies the seed id to every caption).
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from vlmlab import io
from vlmlab.data.formats import FormatError, caption_of, dj_text, dj_to_llava, write_llava
from vlmlab.data.validate import check_image
from vlmlab.seeding import seed_generators

LEFT_RE = re.compile(r"OP \[(?P<op>\w+)\] Done in (?P<s>[\d.]+)s\. Left (?P<left>\d+) samples")  # DJ 1.6.1's log line


class InstallBlocked(RuntimeError):
    pass


@contextlib.contextmanager
def no_runtime_installs():
    """Make Data-Juicer's LazyLoader raise instead of installing a missing package."""
    from data_juicer.utils.lazy_loader import LazyLoader

    original = LazyLoader.__dict__["_install_package"]

    def refuse(cls, package_spec, pip_args=None):
        raise InstallBlocked(f"Data-Juicer tried to install '{package_spec}' at run time; this pipeline never "
                             f"installs while running: pin it in requirements.txt and `pip install` it, "
                             f"or remove the op that needs it from params.yaml synth")

    LazyLoader._install_package = classmethod(refuse)
    try:
        yield
    finally:
        LazyLoader._install_package = original


MODEL_ARGS = ("hf_img2seq", "hf_blip", "hf_clip")  # ops' model arguments in the recipes this module renders


def check_local_models(recipe: Path) -> None:
    """Every model an op names must be a local HF folder: Data-Juicer would otherwise try a hub download."""
    import yaml

    for op in yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))["process"]:
        (name, args), = op.items()
        for key in MODEL_ARGS:
            if key in (args or {}) and not (Path(args[key]) / "config.json").is_file():
                raise io.fail(f"{recipe}: {name}.{key} = '{args[key]}' is not a local model folder (no config.json); "
                              f"models are never downloaded: train it (dvc repro teacher) or point params.yaml "
                              f"synth at a local copy")


def allow_custom_op_reload(recipe: Path) -> None:
    """Let Data-Juicer load the recipe's `custom_operator_paths` again in this process.

    Data-Juicer 1.6.1 imports a custom op file as a module named after the file and refuses a second
    load of that name, even of the same file: a second recipe run in one process (tests, notebooks)
    would fail. Forgetting our own earlier load of the same file lets it load again (our ops register
    with force=True)."""
    import yaml

    for path in yaml.safe_load(Path(recipe).read_text(encoding="utf-8")).get("custom_operator_paths") or []:
        path = os.path.abspath(path)
        name = os.path.splitext(os.path.basename(path))[0]
        loaded = sys.modules.get(name)
        if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == path:
            del sys.modules[name]


def captioner_op(recipe: Path) -> str:
    """The recipe's first op: the captioning mapper (stock or fast)."""
    import yaml

    return next(iter(yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))["process"][0]))


def check_seed_rows(seed_jsonl: Path, workers: int = 2) -> tuple[list[dict], list[dict]]:
    """Seed rows whose image decodes (paths made absolute for Data-Juicer) and rejects for the rest."""
    root = seed_jsonl.parent
    rows, rejects = [], []
    for lineno, row in enumerate(io.read_jsonl(seed_jsonl), 1):
        images = row.get("images")
        if not isinstance(images, list) or len(images) != 1 or not isinstance(row.get("text"), str):
            rejects.append({"line": lineno, "id": row.get("id"), "reason": "bad_schema",
                            "detail": "need 'text' and 'images' with exactly one path"})
            continue
        rows.append((lineno, row))
    with mp.get_context("fork").Pool(workers) as pool:  # full decode of every image is the slow part
        problems = pool.starmap(check_image, [(root, r["images"][0]) for _, r in rows], chunksize=64)
    good = []
    for (lineno, row), bad in zip(rows, problems):
        if bad:
            rejects.append({"line": lineno, "id": row.get("id"), "reason": bad[0], "detail": bad[1]})
        else:
            good.append({**row, "images": [os.path.abspath(root / row["images"][0])]})  # no resolve(): keep links
    return good, rejects


def run_recipe(recipe: Path, dataset_path: Path, work_dir: Path, seed: int) -> dict:
    """Run `recipe` with Data-Juicer's own executor (its `executor_type`), input and work dir overridden.

    Returns {"ops": [(op name, samples left, seconds)], "trace_dir": Path, "export": Path, "seconds": float}.
    """
    from loguru import logger

    streams = sys.stdout, sys.stderr  # Data-Juicer's logger set-up redirects both into loguru
    left: list[tuple[str, int, float]] = []
    try:
        with no_runtime_installs():
            from data_juicer.config import init_configs
            from data_juicer.core import ExecutorFactory

            allow_custom_op_reload(recipe)
            cfg = init_configs(args=["--config", str(recipe), "--dataset_path", str(dataset_path),
                                     "--work_dir", str(work_dir), "--export_path", str(work_dir / "export/dj.jsonl"),
                                     "--ds_cache_dir", str(work_dir / "hf_datasets")])
            cfg.op_list_to_trace = [next(iter(op)) for op in cfg.process if not next(iter(op)).endswith("_mapper")]
            logger.add(lambda m: left.extend((x["op"], int(x["left"]), float(x["s"])) for x in LEFT_RE.finditer(m)),
                       level="INFO")
            seed_generators(seed)  # random_any draws with `random`, generate(do_sample=True) with torch
            executor = ExecutorFactory.create_executor(cfg.executor_type)(cfg)
            t0 = time.perf_counter()
            executor.run()
            seconds = time.perf_counter() - t0
    finally:
        # Data-Juicer swapped loguru's sinks for files in its work dir and redirected stdout/stderr into
        # them; leave neither behind in this process
        logger.remove()
        sys.stdout, sys.stderr = streams
        logger.add(sys.stderr, level="INFO")
    tracer = getattr(executor, "tracer", None)  # the Ray executor's is an actor handle, with no files here
    trace_dir = Path(tracer.work_dir) if isinstance(getattr(tracer, "work_dir", None), str) else None
    return {"ops": left, "trace_dir": trace_dir, "export": Path(cfg.export_path), "seconds": seconds}


def read_export(path: Path) -> list[dict]:
    """Rows Data-Juicer exported: one jsonl (default executor) or a folder of json shards (Ray executor)."""
    if path.is_dir():
        return [row for shard in sorted(path.glob("*.json*")) for row in io.read_jsonl(shard)]
    return io.read_jsonl(path) if path.exists() else []


def op_counts(n_in: int, ops: list[tuple[str, int, float]], trace_dir: Path | None) -> dict:
    """Per op: samples in, out (= kept) and dropped; for filters `dropped` is counted from the tracer's
    records of every dropped sample and must equal in - kept, or the counts do not add up."""
    counts, prev = {}, n_in
    for name, left, seconds in ops:
        entry = {"in": prev, "out": left, "seconds": round(seconds, 2)}
        if not name.endswith("_mapper"):
            traced = _lines(trace_dir / f"sample_trace-{name}.jsonl") if trace_dir else prev - left
            if name.endswith("_deduplicator"):
                traced = prev - left  # its tracer records duplicate pairs, not one line per dropped sample
            if traced != prev - left:
                raise RuntimeError(f"{name}: {prev} in, {left} kept, but the tracer recorded {traced} drops")
            entry.update(kept=left, dropped=traced)
        counts[name] = entry
        prev = left
    return counts


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def filter_rejects(trace_dir: Path | None) -> list[dict]:
    """Every sample a filter dropped, as rejects rows (reason = the op, detail = its stats)."""
    out = []
    for path in sorted(trace_dir.glob("sample_trace-*_filter.jsonl")) if trace_dir else []:
        op = path.stem.removeprefix("sample_trace-")
        for row in io.read_jsonl(path):
            stats = json.dumps(row.get("__dj__stats__", {}), sort_keys=True)
            out.append({"line": None, "id": row.get("id"), "reason": op, "detail": f"{stats} {row.get('text', '')!r}"})
    return out


def normalise(rows: list[dict], image_root: Path) -> tuple[list[dict], list[dict]]:
    """Data-Juicer output rows -> seed-format rows with ids `<id>_<k>` and paths relative to `image_root`."""
    out, rejects, seen = [], [], Counter()
    for n, row in enumerate(rows, 1):
        sid = str(row["id"])
        k = seen[sid]
        seen[sid] += 1
        try:
            caption = caption_of(row["text"])
        except FormatError as e:
            rejects.append({"line": n, "id": f"{sid}_{k}", "reason": e.reason, "detail": e.detail})
            continue
        out.append({"id": f"{sid}_{k}", "text": dj_text(caption), "images": [relative_image(row["images"][0], image_root)]})
    return out, rejects


def relative_image(path: str, image_root: Path) -> str:
    """Data-Juicer's absolute image path, relative to the seed folder: nothing written names the checkout's location."""
    return Path(os.path.abspath(path)).relative_to(os.path.abspath(image_root)).as_posix()


def mapper_trace(seed_rows: list[dict], rows: list[dict], n: int, op: str) -> list[dict]:
    """Before/after for the captioning mapper `op`: a seed caption and the captions of its image that survived the filters."""
    by_id: dict[str, list[str]] = {}
    for r in rows:
        by_id.setdefault(str(r["id"]).rsplit("_", 1)[0], []).append(r["text"])
    out = []
    for r in seed_rows:
        if str(r["id"]) in by_id:
            out.append({"op": op, "id": r["id"], "original_text": r["text"],
                        "processed_texts": by_id[str(r["id"])]})
            if len(out) >= n:
                break
    return out


def write_enhanced(out: Path, raw: Path, rows: list[dict], rejects: list[dict], trace: list[dict], seed: int) -> None:
    """data/enhanced: dj.jsonl, llava.json, rejects.jsonl, trace_sample.jsonl and images/ (links to raw's)."""
    with io.atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for rel in sorted({r["images"][0] for r in rows}):
            io.link_or_copy(raw / rel, tmp / rel)
        io.write_jsonl(tmp / "dj.jsonl", rows)
        write_llava(tmp / "llava.json", dj_to_llava(rows, seed=seed))
        io.write_jsonl(tmp / "rejects.jsonl", rejects)
        io.write_jsonl(tmp / "trace_sample.jsonl", trace)


def synthesize(raw: Path, recipe: Path, out: Path, work: Path, seed: int, trace_sample: int = 20) -> dict:
    """Check the seed, run the recipe, normalise, write `out`; returns flat-able metrics."""
    raw, out, work = Path(raw), Path(out), Path(work)
    seed_jsonl = raw / "dj.jsonl"
    if not seed_jsonl.is_file():
        raise io.fail(f"{seed_jsonl}: no seed set; run `dvc repro prepare` first")
    check_local_models(recipe)
    good, rejects = check_seed_rows(seed_jsonl)
    seed_rejects = len(rejects)
    if not good:
        raise io.fail(f"{seed_jsonl}: none of its {len(rejects)} rows has a readable image; see the importer's rejects")
    if work.exists():
        shutil.rmtree(work)  # a previous run's trace files would be counted again
    work.mkdir(parents=True)
    dataset = work / "input.jsonl"
    io.write_jsonl(dataset, good)
    result = run_recipe(recipe, dataset, work / "dj", seed)
    exported = read_export(result["export"])
    # the Ray executor streams and logs no per-op totals: there only samples in/out are known
    counts = op_counts(len(good), result["ops"], result["trace_dir"]) if result["ops"] else {}
    rows, bad_rows = normalise(exported, raw)
    rejects += filter_rejects(result["trace_dir"]) + bad_rows
    captioner = captioner_op(recipe)
    trace = mapper_trace(good, rows, trace_sample, captioner) + _filter_trace(result["trace_dir"], trace_sample, raw)
    write_enhanced(out, raw, rows, rejects, trace, seed)
    mapper = counts.get(captioner, {"out": 0, "seconds": 0.0})
    return {
        "samples_in": len(good) + seed_rejects,  # seed rows
        "seed_rejects": seed_rejects,  # rows whose image does not decode: never reach Data-Juicer
        "samples_out": len(rows),
        "format_rejects": len(bad_rows),  # exported rows without a caption
        "ops": counts,
        "dj_seconds": round(result["seconds"], 1),
        "captions_per_s": round(mapper["out"] / mapper["seconds"], 1) if mapper["seconds"] else 0.0,
    }


def _filter_trace(trace_dir: Path | None, n: int, image_root: Path) -> list[dict]:
    out = []
    for path in sorted(trace_dir.glob("sample_trace-*.jsonl")) if trace_dir else []:
        op = path.stem.removeprefix("sample_trace-")
        for row in io.read_jsonl(path)[:n]:
            if row.get("images"):
                row["images"] = [relative_image(im, image_root) for im in row["images"]]
            out.append({"op": op, **row})
    return out
