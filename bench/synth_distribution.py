"""Do the fast and the stock captioning op draw captions of the same quality? A check on the tiny world (CPU).

    python bench/synth_distribution.py --out bench/results/synth_distribution.json     # ~10 min on 2 cores
    python bench/synth_distribution.py --seeds 60,61,62 --out bench/results/synth_distribution.json

Builds a tiny world (the default params' curated set; `--images` held-out caption images with 5
references each), trains the teacher with the default params' recipe, and re-captions the held-out images
through Data-Juicer's executor twice, with the recipe the synthesize stage renders (params.yaml synth):
once with the stock `image_captioning_mapper`, once with our `fast_image_captioning_mapper`. Each run is
split in two executor runs (the mapper alone, then the recipe's filters on its output) so every
candidate is scored, not only those the filters keep. Reported per op: CIDEr-D and BLEU-4 of all
caption_num candidates against the image's references (pycocoevalcap, vlmlab.evaluate.captions), the
share of captions the filters keep, and the paired difference fast - stock with a 95% bootstrap interval
over images (resampling images, both ops' candidates of an image together). "Same" = each interval
holds 0. Under `pin()`, as the stages, so the teacher and its captions are the same on any x86 CPU.
With several seeds, each seed is reported (`per_seed`) and all of them together (`pooled`: an image's
candidates from every seed scored as one set, one interval over images): the test that does not count
on each of several intervals, one in twenty of which misses 0 by chance, holding 0.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` from a plain checkout
from vlmlab.determinism import pin; pin()  # noqa: E402,E702  first, as the stages: the same teacher and captions on any x86

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from vlmlab import io  # noqa: E402
from vlmlab.data.formats import caption_of  # noqa: E402
from vlmlab.evaluate.captions import ptb_tokenize  # noqa: E402
from vlmlab.seeding import seed_everything  # noqa: E402
from vlmlab.synth import recipe as R  # noqa: E402
from vlmlab.sim import teacher as T  # noqa: E402
from vlmlab.synth import captioner as C  # noqa: E402
from vlmlab.synth.run import run_recipe  # noqa: E402
from vlmlab.sim.text import world_words  # noqa: E402
from vlmlab.sim.world import build_world  # noqa: E402


def teacher_folder(work: Path, params: dict, images: int) -> tuple[Path, list[dict]]:
    """Train the default teacher on a fresh world; returns its folder and the held-out caption rows."""
    world = dict(params["world"], curated_size=params["world"]["curated_size"], instruct_size=1, eval_textvqa=1,
                 eval_caption=images, eval_mmbench=1)
    build_world(None, work / "world", {**params, "world": world})
    tp = params["teacher"]
    cfg = T.TeacherConfig(**{k: v for k, v in tp.items() if k in T.TeacherConfig.__dataclass_fields__})
    pics, captions, _ = C.read_caption_set(work / "world" / "curated")
    seed_everything(params["seed"] + 50)
    model, processor = T.build_teacher(cfg, world_words())
    T.train_teacher(model, processor, pics, captions, cfg, params["seed"] + 50)
    T.save_teacher(model, processor, work / "teacher")
    return work / "teacher", io.read_jsonl(work / "world" / "eval" / "captions.jsonl")


def recaption(op: str, params: dict, teacher: Path, seed_jsonl: Path, work: Path, seed: int) -> dict:
    """Mapper, then filters, through Data-Juicer's executor. Returns {"captions": {image id: [..]}, "kept": {..}}."""
    cfg = R.SynthConfig.from_params({**params["synth"], "captioner_op": op})
    rendered = R.render_recipe(cfg, captioner=str(teacher), dataset_path=str(seed_jsonl),
                               export_path=str(work / "x.jsonl"), work_dir=str(work))
    mapper, filters = dict(rendered, process=rendered["process"][:1]), dict(rendered, process=rendered["process"][1:])
    (work / "mapper.yaml").parent.mkdir(parents=True, exist_ok=True)
    (work / "mapper.yaml").write_text(yaml.safe_dump(mapper, sort_keys=False))
    (work / "filters.yaml").write_text(yaml.safe_dump(filters, sort_keys=False))
    t0 = time.perf_counter()
    made = run_recipe(work / "mapper.yaml", seed_jsonl, work / "mapper", seed)
    mapper_s = time.perf_counter() - t0
    kept = run_recipe(work / "filters.yaml", made["export"], work / "filters", seed)
    out = {"captions": {}, "kept": {}, "mapper_s": round(mapper_s, 1)}
    for key, path in (("captions", made["export"]), ("kept", kept["export"])):
        for row in io.read_jsonl(path):
            out[key].setdefault(str(row["id"]), []).append(caption_of(row["text"]))
    return out


def per_caption_scores(captions: dict[str, list[str]], refs: dict[str, list[str]]) -> tuple[list[str], np.ndarray, dict]:
    """(keys "id#k", CIDEr-D per caption, tokenised gts/res for BLEU) with document frequencies from all refs."""
    from pycocoevalcap.cider.cider import Cider

    keys = [f"{i}#{k}" for i in sorted(captions) for k in range(len(captions[i]))]
    res = {key: [ptb_tokenize(captions[key.split("#")[0]][int(key.split("#")[1])])] for key in keys}
    gts = {key: [ptb_tokenize(r) for r in refs[key.split("#")[0]]] for key in keys}
    _, cider = Cider().compute_score(gts, res)
    return keys, np.asarray(cider, dtype=float), {"gts": gts, "res": res}


def corpus_bleu4(tok: dict, keys: list[str]) -> float:
    from pycocoevalcap.bleu.bleu import Bleu

    # Bleu wants unique keys: a resample that draws an image twice gets suffixed copies
    gts, res = {}, {}
    for n, key in enumerate(keys):
        gts[f"{key}@{n}"], res[f"{key}@{n}"] = tok["gts"][key], tok["res"][key]
    return float(Bleu(4).compute_score(gts, res, verbose=0)[0][3])


def interval(values: np.ndarray) -> list[float]:
    return [round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)]


def compare(runs: dict, refs: dict[str, list[str]], n: int, a) -> dict:
    """Scores of each op's `n` candidates per image and fast - stock with 95% bootstrap intervals over images."""
    ids = sorted(refs)
    for op, run in runs.items():
        missing = [i for i in ids if len(run["captions"].get(i, [])) != n]
        if missing:
            raise SystemExit(f"{op}: {len(missing)} images without {n} captions, e.g. {missing[0]}")
    scored = {op: per_caption_scores({i: runs[op]["captions"][i] for i in ids}, refs) for op in runs}
    cider = {op: scored[op][1].reshape(len(ids), n) for op in runs}                 # (images, n)
    kept = {op: np.array([len(runs[op]["kept"].get(i, [])) / n for i in ids]) for op in runs}
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(ids), size=(a.bootstrap, len(ids)))
    d_cider = cider["fast"].mean(1)[draws].mean(1) - cider["stock"].mean(1)[draws].mean(1)
    d_kept = kept["fast"][draws].mean(1) - kept["stock"][draws].mean(1)
    keys = {op: np.array(scored[op][0]).reshape(len(ids), n) for op in runs}
    d_bleu = np.array([corpus_bleu4(scored["fast"][2], keys["fast"][d].ravel().tolist())
                       - corpus_bleu4(scored["stock"][2], keys["stock"][d].ravel().tolist())
                       for d in draws[:a.bootstrap_bleu]])
    result = {"ops": {op: {"cider_d": round(float(cider[op].mean()), 4),
                           "bleu_4": round(corpus_bleu4(scored[op][2], scored[op][0]), 4),
                           "kept_share": round(float(kept[op].mean()), 4), "mapper_s": runs[op]["mapper_s"]}
                      for op in runs},
              "fast_minus_stock": {"cider_d": {"diff": round(float(cider["fast"].mean() - cider["stock"].mean()), 4),
                                               "ci95": interval(d_cider), "resamples": a.bootstrap},
                                   "bleu_4": {"ci95": interval(d_bleu), "resamples": len(d_bleu)},
                                   "kept_share": {"ci95": interval(d_kept), "resamples": a.bootstrap}}}
    result["fast_minus_stock"]["bleu_4"]["diff"] = round(result["ops"]["fast"]["bleu_4"] - result["ops"]["stock"]["bleu_4"], 4)
    result["same"] = {k: v["ci95"][0] <= 0 <= v["ci95"][1] for k, v in result["fast_minus_stock"].items()}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="held-out images re-captioned by each op")
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples (CIDEr-D, kept share)")
    ap.add_argument("--bootstrap-bleu", type=int, default=200, help="resamples for corpus BLEU-4 (slower)")
    ap.add_argument("--work", default="work/synth_distribution")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", default=None, help="seeds of the captioning runs, comma-separated (default: the "
                    "stage's); with several, also `pooled`: every seed's candidates of an image scored together")
    ap.add_argument("--reuse", action="store_true", help="reuse --work's world and teacher from an earlier run")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    params = io.load_params(a.params)
    work = Path(a.work)
    t0 = time.perf_counter()
    if a.reuse and (work / "teacher" / "config.json").is_file():
        teacher, rows = work / "teacher", io.read_jsonl(work / "world" / "eval" / "captions.jsonl")
    else:
        teacher, rows = teacher_folder(work, params, a.images)
    teacher_s = time.perf_counter() - t0
    refs = {str(r["id"]): r["captions"] for r in rows}
    seed_rows = [{"id": str(r["id"]), "text": f"<__dj__image>\n{r['captions'][0]} <|__dj__eoc|>",
                  "images": [str((work / "world" / "eval" / r["image"]).resolve())]} for r in rows]
    io.write_jsonl(work / "seed.jsonl", seed_rows)
    seeds = [params["seed"] + 60] if a.seeds is None else [int(s) for s in str(a.seeds).split(",")]
    n = params["synth"]["caption_num"]
    runs = {s: {op: recaption(op, params, teacher, work / "seed.jsonl", work / f"{op}_{s}", s) for op in ("stock", "fast")}
            for s in seeds}
    result = {"images": len(refs), "caption_num": n, "references_per_image": len(rows[0]["captions"]),
              "seeds": seeds, "teacher_train_s": round(teacher_s, 1), "params": a.params,
              "per_seed": {s: compare(by_op, refs, n, a) for s, by_op in runs.items()}}
    if len(seeds) > 1:  # every seed's candidates of an image together: one interval over images for all seeds
        pooled = {op: {part: {i: [c for s in seeds for c in runs[s][op][part].get(i, [])] for i in refs}
                       for part in ("captions", "kept")} | {"mapper_s": sum(runs[s][op]["mapper_s"] for s in seeds)}
                  for op in ("stock", "fast")}
        result["pooled"] = compare(pooled, refs, n * len(seeds), a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
