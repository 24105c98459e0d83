"""Seed replicates of the whole study, from `dvc exp show --json`: mean ± sd over seeds.

The bootstrap intervals of `compare` say how much the *items* could move a result; a seed
sweep says how much the *training* does (world, teacher, synthesis, initialisation and
data order all derive from params `seed`). Each replicate is a DVC experiment that
differs from the others in `seed` only; this module reads their metrics/compare.json as
`dvc exp show --json` lists them and summarises every model's headline metrics and every
factor effect over the seeds, with how many seeds called the effect.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from vlmlab import io
from vlmlab.evaluate import bootstrap, items

COMPARE = "metrics/compare.json"
TEACHER = "metrics/teacher.json"
PARAMS = "params.yaml"
MAIN_EFFECTS = ("data", "strategy", "interaction")   # plotted; the simple effects are in the table
# experiments of the two side studies, by name (stages/sweep.py names them): not seed replicates
TEACHER_PREFIX, DOSE_PREFIX = "teacher-seed", "dose-"


@dataclass
class Replicate:
    name: str                   # experiment name, or the commit/branch name of a baseline row
    rev: str
    seed: int
    params: dict                # params.yaml without `seed`
    models: dict[str, dict]     # model -> {metric: value} (compare.json "models")
    effects: dict[str, dict]    # effect -> metric -> {"value", "ci_low", "ci_high", "called"}


@dataclass
class Sweep:
    replicates: list[Replicate] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)    # "name: why" for rows that could not be used


def _states(shown: list[dict]):
    """Every experiment state `dvc exp show --json` lists: baseline commits and their experiments."""
    for row in shown:
        yield row, None
        for exp_range in row.get("experiments") or []:
            state = (exp_range.get("executor") or {}).get("state")
            for exp in exp_range.get("revs") or []:
                yield exp, state


def _name(state: dict) -> str:
    rev = state.get("rev", "?")
    return state.get("name") or (rev if rev == "workspace" else rev[:7])


def _file(state: dict, kind: str, path: str) -> dict | None:
    """A params or metrics file's content in one experiment state (None where DVC has none)."""
    return (((state.get("data") or {}).get(kind) or {}).get(path) or {}).get("data")


def _check(shown) -> None:
    if not isinstance(shown, list):
        raise io.fail("dvc exp show --json: expected a JSON list of experiment states (DVC 3)")


def _unusable(state: dict, executor: str | None) -> str | None:
    """Why an experiment state has no results to read (queued, running, failed, an error, no params), or None."""
    if executor in ("queued", "running", "failed"):
        return executor
    if state.get("error"):
        return "error"
    return None if _file(state, "params", PARAMS) else f"no {PARAMS}"


def only(shown: list[dict], prefix: str) -> list[dict]:
    """The finished experiments named `prefix...` of every commit, each standing as a row of its own and
    named without the prefix, so that `<prefix>dose-...` and `<prefix>teacher-seed...` are side studies."""
    _check(shown)
    return [{**{k: v for k, v in state.items() if k != "experiments"}, "name": _name(state)[len(prefix):]}
            for state, executor in _states(shown) if _name(state).startswith(prefix) and not _unusable(state, executor)]


def read(shown: list[dict], include_workspace: bool = False) -> Sweep:
    """Replicates from the parsed `dvc exp show --json` output (a list of experiment states)."""
    _check(shown)
    out = Sweep()
    for state, executor in _states(shown):
        name = _name(state)
        if state.get("rev") == "workspace" and not include_workspace:
            continue
        if name.startswith((TEACHER_PREFIX, DOSE_PREFIX)):
            continue  # a side study's experiment (teacher_seeds / dose below), not a replicate of the study
        params, metrics = _file(state, "params", PARAMS), _file(state, "metrics", COMPARE)
        why = _unusable(state, executor) or (None if metrics else f"no {COMPARE}")
        if why:
            out.skipped.append(f"{name}: {why}")
            continue
        rest = {k: v for k, v in params.items() if k != "seed"}
        out.replicates.append(Replicate(name, state["rev"], int(params["seed"]), rest,
                                        metrics.get("models", {}), metrics.get("effects", {})))
    return out


def groups(sweep: Sweep) -> list[list[Replicate]]:
    """Replicates grouped by every param but `seed`; one replicate per seed (the first listed) in each."""
    by_params: dict[str, dict[int, Replicate]] = {}
    for r in sweep.replicates:
        by_params.setdefault(json.dumps(r.params, sort_keys=True), {}).setdefault(r.seed, r)
    return [sorted(g.values(), key=lambda r: r.seed) for g in by_params.values()]


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN sd for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summary_rows(group: list[Replicate], metrics: list[str]) -> tuple[list[dict], list[dict]]:
    """(per model and metric, per effect and metric) rows: mean, sd, n, values by seed; effects: seeds called."""
    models = list(dict.fromkeys(m for r in group for m in r.models))
    model_rows = []
    for model in models:
        for metric in metrics:
            vals = {r.seed: r.models[model][metric] for r in group if metric in r.models.get(model, {})}
            if vals:
                mean, sd = mean_sd(list(vals.values()))
                model_rows.append({"model": model, "metric": metric, "mean": mean, "sd": sd, "n": len(vals),
                                   "by_seed": vals})
    effect_rows = []
    for effect in dict.fromkeys(e for r in group for e in r.effects):
        for metric in metrics:
            got = [(r.seed, r.effects[effect][metric]) for r in group if metric in r.effects.get(effect, {})]
            if got:
                mean, sd = mean_sd([e["value"] for _, e in got])
                effect_rows.append({"effect": effect, "metric": metric, "mean": mean, "sd": sd, "n": len(got),
                                    "called": sum(int(e["called"]) for _, e in got),
                                    "positive": sum(e["value"] > 0 for _, e in got),
                                    "by_seed": {s: e["value"] for s, e in got}})
    return model_rows, effect_rows


def _num(v: float, sign: str = "") -> str:
    """4 decimals; below 1e-3 in scientific notation (a tiny spread must not read as 0.0000)."""
    return f"{v:{sign}.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:{sign}.2e}"


def _ms(row: dict) -> str:
    return f"{_num(row['mean'])} ± {_num(row['sd'])}" if not math.isnan(row["sd"]) else _num(row["mean"])


def render(sweep: Sweep, metrics: list[str], figure: str | None = None) -> str:
    out = ["# Seed sweep", "",
           "Each replicate is the whole study (world, teacher, synthesis, training, evaluation) with another "
           "`seed`; everything else equal. Mean ± sample sd over seeds; an effect's *called* count is the number "
           "of seeds whose paired-bootstrap interval excluded 0.", ""]
    gs = groups(sweep)
    if not gs:
        out += ["No finished replicate with metrics/compare.json yet.", ""]
    for i, group in enumerate(gs, 1):
        seeds = [r.seed for r in group]
        sub = "###" if len(gs) > 1 else "##"
        if len(gs) > 1:
            out += [f"## Params group {i}" + (" (plotted)" if i == 1 else ""), ""]
        out += [f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)} replicates: "
                + ", ".join(f"`{r.name}`" for r in group) + ").", ""]
        model_rows, effect_rows = summary_rows(group, metrics)
        if effect_rows:
            out += [f"{sub} Factor effects over seeds", "",
                    "| effect | metric | mean ± sd | > 0 in | called in | by seed |", "|---|---|---|---|---|---|"]
            for r in effect_rows:
                by = ", ".join(f"{s}: {_num(v, '+')}" for s, v in r["by_seed"].items())
                out.append(f"| {r['effect']} | {r['metric']} | {_num(r['mean'], '+')} ± {_num(r['sd'])} | "
                           f"{r['positive']}/{r['n']} | {r['called']}/{r['n']} | {by} |")
            out += [""]
        if model_rows:
            out += [f"{sub} Metrics per model over seeds", "", "| model | " + " | ".join(metrics) + " |",
                    "|" + "---|" * (len(metrics) + 1)]
            for model in dict.fromkeys(r["model"] for r in model_rows):
                cells = {r["metric"]: _ms(r) for r in model_rows if r["model"] == model}
                out.append(f"| {model} | " + " | ".join(cells.get(m, "—") for m in metrics) + " |")
            out += [""]
    if sweep.skipped:
        out += ["Not used: " + "; ".join(sweep.skipped) + ".", ""]
    if figure:
        out += [f"![sweep]({figure})", ""]
    return "\n".join(out)


def draw(path, sweep: Sweep, metrics: list[str]) -> bool:
    """Per metric: each model's seeds (dots) with mean ± sd, and the main effects' mean ± sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = groups(sweep)
    group = gs[0] if gs else []
    model_rows, effect_rows = summary_rows(group, metrics) if group else ([], [])
    fig, axes = plt.subplots(2, len(metrics), figsize=(3.2 * len(metrics), 6.5), dpi=100, squeeze=False)
    for j, metric in enumerate(metrics):
        for row_i, (rows, label) in enumerate(((model_rows, "model"), (effect_rows, "effect"))):
            ax = axes[row_i][j]
            pts = [r for r in rows if r["metric"] == metric and (label == "model" or r["effect"] in MAIN_EFFECTS)]
            ys = list(range(len(pts)))[::-1]
            for y, r in zip(ys, pts):
                ax.scatter(list(r["by_seed"].values()), [y] * r["n"], s=12, color="tab:gray", zorder=2)
                sd = 0.0 if math.isnan(r["sd"]) else r["sd"]
                ax.errorbar(r["mean"], y, xerr=sd, fmt="D", color="tab:blue", capsize=3, zorder=3)
            if label == "effect":
                ax.axvline(0.0, color="black", linewidth=0.8)
            ax.set_yticks(ys, [r[label] for r in pts], fontsize=8)
            ax.set_ylim(-0.6, max(len(pts), 1) - 0.4)
            ax.set_title(f"{metric} ({'per model' if label == 'model' else 'main effects'})", fontsize=9)
    fig.suptitle(f"seed sweep: {len(group)} replicates, mean ± sd (dots: seeds)", fontsize=10)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return bool(group)


def _finished(shown: list[dict]):
    """(name, params, state) of every finished state but the workspace."""
    _check(shown)
    for state, executor in _states(shown):
        if state.get("rev") != "workspace" and not _unusable(state, executor):
            yield _name(state), _file(state, "params", PARAMS), state


def teacher_seeds(shown: list[dict]) -> list[dict]:
    """The teacher's held-out scores per seed: every finished state with metrics/teacher.json whose
    world and teacher params equal the first one's (the committed study); one row per seed."""
    rows, ref = {}, None
    for name, params, state in _finished(shown):
        metrics = _file(state, "metrics", TEACHER)
        if not metrics or "teacher_sampled" not in metrics or name.startswith(DOSE_PREFIX):
            continue  # a dose run trains no teacher: it lists its commit's teacher.json under its own seed
        key = (params.get("world"), params.get("teacher"))
        ref = ref or key
        if key == ref:
            rows.setdefault(int(params["seed"]), {"seed": int(params["seed"]), "name": name,
                                                  **{f"sampled_{k}": v for k, v in metrics["teacher_sampled"].items()},
                                                  **{f"greedy_{k}": v for k, v in metrics.get("teacher_greedy", {}).items()}})
    return [rows[s] for s in sorted(rows)]


def dose(shown: list[dict], model: str = "baseline") -> list[dict]:
    """Stage-1 data dose-response: one row per stage-1 caption set (world.raw_size, world.noise_rate),
    fewest captions first, with `model`'s eval metrics (and intervals) per seed. A row's runs are the
    `dose-*` experiments and the replicates of the study itself (the committed set, per seed), all with
    the first listed state's params but for seed, raw_size and noise_rate (another recipe is no dose)."""
    runs, ref = {}, None
    for name, params, state in _finished(shown):
        metrics = _file(state, "metrics", f"metrics/eval/{model}.json")
        if not metrics or name.startswith(TEACHER_PREFIX):  # a teacher-only run lists the commit's eval files
            continue
        world = params.get("world", {})
        size, noise = world.get("raw_size"), world.get("noise_rate")
        recipe = json.dumps({**params, "seed": None, "world": {**world, "raw_size": None, "noise_rate": None}},
                            sort_keys=True)
        ref = ref or recipe
        if recipe == ref:
            runs.setdefault((size, noise), {}).setdefault(int(params["seed"]), {"name": name, "rev": state.get("rev"),
                                                                                 "metrics": metrics})
    return [{"captions": size, "noise_rate": noise, "seeds": dict(sorted(by_seed.items()))}
            for (size, noise), by_seed in sorted(runs.items(), key=lambda kv: (kv[0][0], -kv[0][1]))]


def dose_of_another_commit(doses: list[dict], here: list[dict], same_pipeline: bool = False) -> list[dict]:
    """`doses`, another commit's dose side study (`dose` of its experiments), for this commit's report.

    Sound only where this commit's change leaves the dose model's runs alone (a new teacher recipe: the
    `baseline` trains on raw captions only): then each of this commit's own runs, `here` (`dose` of its
    states), scores exactly as the other commit's run of its stage-1 set and seed, on every headline
    metric and interval. Anything else fails: the dose study must be queued again. `same_pipeline`: the two
    commits hold the same dvc.yaml, dvc.lock and params.yaml (every stage's code by hash), so this commit's
    run of a seed the other commit has none of is the run that commit would make: it joins the rows; the runs
    the other commit has are still checked."""
    rows = {(r["captions"], r["noise_rate"]): r for r in doses}
    checked, joined = 0, False
    for row in here:
        key = (row["captions"], row["noise_rate"])
        for seed, run in row["seeds"].items():
            other = rows.get(key, {}).get("seeds", {}).get(seed)
            if other is None and same_pipeline:
                target = rows.get(key, {"captions": key[0], "noise_rate": key[1], "seeds": {}})
                rows[key] = dict(target, seeds=dict(sorted({**target["seeds"], seed: run}.items())))  # doses' rows stay
                joined = True
                continue
            if other is None:
                raise io.fail(f"dose of another commit: no run of {row['captions']} captions "
                              f"(noise {row['noise_rate']}), seed {seed} there to check `{run['name']}` against")
            for name in (f"{m}{end}" for m in items.HEADLINE for end in ("", "_ci_low", "_ci_high")):
                if run["metrics"].get(name) != other["metrics"].get(name):
                    raise io.fail(f"dose of another commit: `{run['name']}` {name} {run['metrics'].get(name)} != "
                                  f"`{other['name']}` {other['metrics'].get(name)} there: this commit changed its runs; "
                                  "queue the dose study again")
            checked += 1
    if not checked:
        raise io.fail("dose of another commit: this commit has no run of the dose model to check it against")
    return sorted(rows.values(), key=lambda r: (r["captions"], -r["noise_rate"])) if joined else doses


def dose_steps(doses: list[dict], statistics, metrics: list[str], samples: int, seed: int, level: float,
               reference=None) -> list[dict]:
    """Each dose row against its reference (`reference(doses, i)`, default `_reference`: the adjacent step;
    `from_smallest`: the smallest set of its noise) as paired differences on the same eval items:
    `statistics(rev)` gives a run's per-item statistics (items.load_statistics of its predictions). Per seed
    the row's and the reference's metric are resampled with the same counts (their eval sets are the same
    world's); over seeds, the mean of the per-seed differences, each seed's items resampled on their own
    (a stratified bootstrap), so the interval narrows with every seed. -> one dict per stepped row:
    {"row", "reference", "metrics": {metric: {"value", "ci_low", "ci_high", "seeds": [(seed, Interval)]}}}."""
    out = []
    for i, row in enumerate(doses):
        ref = (reference or _reference)(doses, i)
        shared = [s for s in row["seeds"] if ref and s in ref["seeds"]]
        if not shared:
            continue
        steps = {}
        for metric in metrics:
            full, boot, per_seed = [], [], []
            for s in shared:
                stats = items.align({"row": statistics(row["seeds"][s]["rev"]),
                                     "reference": statistics(ref["seeds"][s]["rev"])}, metric)
                if len(stats) < 2:
                    break
                counts = items.resample_counts_for(stats, samples, seed + s)
                # each run's metric resampled once (a corpus CIDEr-D per resample is the slow part): the
                # seed's paired interval and the pooled one both come from these differences
                boot.append(stats["row"].values(counts) - stats["reference"].values(counts))
                full.append(bootstrap.point(stats["row"]) - bootstrap.point(stats["reference"]))
                per_seed.append((s, bootstrap.Interval(full[-1], *bootstrap.percentile_interval(boot[-1], level))))
            else:
                low, high = bootstrap.percentile_interval(np.mean(boot, axis=0), level)
                steps[metric] = {"value": float(np.mean(full)), "ci_low": low, "ci_high": high, "seeds": per_seed}
        out.append({"row": row, "reference": ref, "metrics": steps})
    return out


def _ci(m: dict, metric: str) -> str:
    return f"{_num(m[metric])} [{_num(m[metric + '_ci_low'])}, {_num(m[metric + '_ci_high'])}]" \
        if f"{metric}_ci_low" in m else _num(m[metric])


def _read(m: dict, metric: str) -> str:
    key = f"{metric}_minus_blind"
    if key not in m:
        return ""
    low, high = m.get(key + "_ci_low", math.nan), m.get(key + "_ci_high", math.nan)
    text = f"{_num(m[key])} [{_num(low)}, {_num(high)}]"
    return f"**{text}**" if low > 0 or high < 0 else text


def _beyond(a: dict, b: dict, metric: str) -> str:
    """How `b` stands against `a`: beyond a's interval (and a beyond b's) upward or downward, else within."""
    if f"{metric}_ci_low" not in a or f"{metric}_ci_low" not in b:
        return ""
    if b[f"{metric}_ci_low"] > a[f"{metric}_ci_high"]:
        return " ↑"
    if b[f"{metric}_ci_high"] < a[f"{metric}_ci_low"]:
        return " ↓"
    return " ≈"


def render_side_studies(teacher: list[dict], doses: list[dict], metrics: list[str], model: str = "baseline",
                        steps: list[dict] | None = None, spans: list[dict] | None = None, dose_rev: str = "") -> str:
    out = []
    if teacher:
        best, worst = max(r["sampled_cider"] for r in teacher), min(r["sampled_cider"] for r in teacher)
        out += ["## Teacher over seeds", "",
                f"The tiny BLIP-2 teacher's held-out CIDEr-D (200 images x 5 references) per `seed` (world and "
                f"teacher params of the committed study): worst {_num(worst)}, best {_num(best)}, worst/best "
                f"{worst / best:.3f}.", "",
                "| seed | experiment | CIDEr-D sampled | BLEU-4 sampled | CIDEr-D greedy | sign's word named, sampled / greedy |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['seed']} | `{r['name']}` | {_num(r['sampled_cider'])} | {_num(r['sampled_bleu_4'])} | "
                f"{_num(r.get('greedy_cider', math.nan))} | {_num(r.get('sampled_sign_word_acc', math.nan))} / "
                f"{_num(r.get('greedy_sign_word_acc', math.nan))} |" for r in teacher]
        out += [""]
    if doses:
        out += _render_dose(doses, metrics, model, dose_rev)
    if steps:
        out += _render_steps(steps, metrics)
    if spans:
        out += ["From the smallest set of each noise level over more than one step (`from_smallest`), the same way:", ""]
        out += _render_steps(spans, metrics)[2:]
    return "\n".join(out)


def _render_steps(steps: list[dict], metrics: list[str]) -> list[str]:
    out = ["Each step as a paired difference (row − reference, on the same eval items of each seed): the mean over "
           "seeds [95% stratified bootstrap interval], **bold** where it excludes 0; ↑k/↓k: the seed's own paired "
           "interval excludes 0 upward/downward in k seeds.", "",
           "| step | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for st in steps:
        cells = []
        for metric in metrics:
            d = st["metrics"].get(metric)
            if not d:
                cells.append("")
                continue
            text = f"{_num(d['value'], '+')} [{_num(d['ci_low'], '+')}, {_num(d['ci_high'], '+')}]"
            up = sum(i.ci_low > 0 for _, i in d["seeds"])
            down = sum(i.ci_high < 0 for _, i in d["seeds"])
            cells.append((f"**{text}**" if d["ci_low"] > 0 or d["ci_high"] < 0 else text) +
                         f" ↑{up}/↓{down} of {len(d['seeds'])}")
        step = (f"{st['reference']['captions']} @ {st['reference']['noise_rate']} → "
                f"{st['row']['captions']} @ {st['row']['noise_rate']}")
        out.append(f"| {step} | " + " | ".join(cells) + " |")
    return out + [""]


def _render_dose(doses: list[dict], metrics: list[str], model: str, dose_rev: str = "") -> list[str]:
    many = any(len(r["seeds"]) > 1 for r in doses)
    source = [] if not dose_rev else [
        f"These experiments were queued from commit `{dose_rev}`. Wherever that commit has a `{model}` run of a "
        "seed, this commit's own run scores exactly as it (every headline metric and interval; "
        "`dose_of_another_commit` checks it); a seed it has none of is accepted only where both commits hold "
        "the same dvc.yaml, dvc.lock and params.yaml. So this commit's change does not touch them.", ""]
    out = ["## Stage-1 data dose-response", "", *source,
           f"`{model}` (stage 1 on the raw seed captions, stage 2 full) with another stage-1 caption set: "
           "`world.raw_size` captions, `world.noise_rate` of them wrong or off-topic (0: all accurate). " +
           "Each row against its reference: the noisier set of its size (quality), else the last smaller set "
           "of its noise (amount). " +
           ("Mean ± sd over seeds; ↑k/↓k: in k seeds the row's 95% bootstrap interval lies wholly above/below "
            "the reference's of the same seed (of the seeds both rows have)." if many else
            "Value [95% bootstrap interval]; ↑/↓: the interval lies wholly above/below the reference's, "
            "≈: they overlap."), "",
           *_table(doses, metrics, lambda i, r, m: _dose_cell(r, _reference(doses, i), m, many))]
    read = [m for m in metrics if any(f"{m}_minus_blind" in x["metrics"] for r in doses for x in r["seeds"].values())]
    if read:  # a metric can move with stage-1 data through caption style alone: does the model see more?
        out += ["Does it read its image: seeing − blind (`evaluate.blind_control`, paired interval; " +
                ("mean ± sd over seeds, reads k/n: the interval excludes 0 upward in k of n seeds)." if many else
                 "**bold**: the interval excludes 0)."), "",
                *_table(doses, read, lambda i, r, m: _read_cell(r, m, many))]
    return out


def _table(doses: list[dict], metrics: list[str], cell) -> list[str]:
    """One row per caption set: its runs, size, noise, then `cell(row index, row, metric)` per metric."""
    out = ["| experiments | stage-1 captions | noise | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 3)]
    out += [f"| {_names(r)} | {r['captions']} | {r['noise_rate']} | " + " | ".join(cell(i, r, m) for m in metrics) + " |"
            for i, r in enumerate(doses)]
    return out + [""]


def _reference(doses: list[dict], i: int) -> dict | None:
    """What row i is measured against: the noisier set of the same size (a quality step), else the last
    smaller set of the same noise (an amount step); None for the first of its kind."""
    r = doses[i]
    noisier = [d for d in doses if d["captions"] == r["captions"] and d["noise_rate"] > r["noise_rate"]]
    if noisier:
        return max(noisier, key=lambda d: d["noise_rate"])
    smaller = [d for d in doses[:i] if d["noise_rate"] == r["noise_rate"] and d["captions"] < r["captions"]]
    return smaller[-1] if smaller else None


def from_smallest(doses: list[dict], i: int) -> dict | None:
    """Row i against the smallest set of its noise where that is not already its adjacent step (`_reference`):
    whether amount moves the metric over more than one step, where one step is too small to resolve."""
    r = doses[i]
    smaller = [d for d in doses if d["noise_rate"] == r["noise_rate"] and d["captions"] < r["captions"]]
    first = min(smaller, key=lambda d: d["captions"]) if smaller else None
    return first if first is not None and first is not _reference(doses, i) else None


def _names(row: dict) -> str:
    return ", ".join(f"`{x['name']}`" for x in row["seeds"].values())


def _dose_cell(row: dict, prev: dict | None, metric: str, many: bool) -> str:
    got = {s: x["metrics"] for s, x in row["seeds"].items() if metric in x["metrics"]}
    if not got:
        return ""
    if not many:
        (m,) = got.values()
        return _ci(m, metric) + (_beyond(next(iter(prev["seeds"].values()))["metrics"], m, metric) if prev else "")
    text = _spread([m[metric] for m in got.values()])
    if prev:
        steps = [_beyond(prev["seeds"][s]["metrics"], m, metric) for s, m in got.items() if s in prev["seeds"]]
        text += f" ↑{steps.count(' ↑')}/↓{steps.count(' ↓')} of {len(steps)}"
    return text


def _read_cell(row: dict, metric: str, many: bool) -> str:
    got = [x["metrics"] for x in row["seeds"].values() if f"{metric}_minus_blind" in x["metrics"]]
    if not many:
        return _read(got[0], metric) if got else ""
    if not got:
        return ""
    reads = sum(m.get(f"{metric}_minus_blind_ci_low", math.nan) > 0 for m in got)
    return f"{_spread([m[f'{metric}_minus_blind'] for m in got])}, reads {reads}/{len(got)}"


def _spread(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{_num(mean)} ± {_num(sd)}" if len(values) > 1 else f"{_num(mean)} (1 seed)"
