"""The 2x2 study {data} x {strategy}: which evaluated model fills each cell, and the factor
effects as contrasts of the four cells.

Cells come from params, not names: each run declares `data` and `strategy`; the model of a
run is its merged folder (models/merged/<run>) when one is evaluated, else the run's own
(models/runs/<run>). Effects, with r/e the data levels and f/l the strategies:
- data        = mean over strategies of (e - r) = ((e,f) - (r,f) + (e,l) - (r,l)) / 2
- strategy    = mean over data of (l - f)       = ((r,l) - (r,f) + (e,l) - (e,f)) / 2
- interaction = (e,l) - (r,l) - ((e,f) - (r,f)): how much the data effect changes with the strategy
and the four simple effects (one factor's difference within each level of the other).
"""
from __future__ import annotations

from pathlib import Path

Cells = dict[tuple[str, str], str]   # (data level, strategy level) -> evaluated model name


def run_models(runs: dict[str, dict], models: dict[str, str]) -> dict[str, str]:
    """run -> the evaluated model standing for it (merged preferred), for runs that have one."""
    by_path = {Path(p).as_posix().rstrip("/"): name for name, p in models.items()}
    out = {}
    for run in runs:
        for folder in (f"models/merged/{run}", f"models/runs/{run}"):
            if folder in by_path:
                out[run] = by_path[folder]
                break
    return out


def cells(runs: dict[str, dict], models: dict[str, str], data_levels: list[str],
          strategy_levels: list[str]) -> tuple[Cells | None, str]:
    """The four cells, or None and the reason the runs do not make a 2x2 design."""
    if len(data_levels) != 2 or len(strategy_levels) != 2:
        return None, "the design needs exactly two data levels and two strategies"
    standing = run_models(runs, models)
    filled: dict[tuple[str, str], list[str]] = {}
    for run, spec in runs.items():
        cell = (spec.get("data"), spec.get("strategy"))
        if cell[0] in data_levels and cell[1] in strategy_levels and run in standing:
            filled.setdefault(cell, []).append(standing[run])
    for d in data_levels:
        for s in strategy_levels:
            got = filled.get((d, s), [])
            if len(got) != 1:
                why = "no evaluated run" if not got else f"{len(got)} runs ({', '.join(got)})"
                return None, f"cell data={d}, strategy={s} has {why}; each cell needs exactly one"
    return {cell: names[0] for cell, names in filled.items()}, ""


def contrasts(c: Cells, data_levels: list[str], strategy_levels: list[str]) -> dict[str, dict[str, float]]:
    """Effect name -> {model: weight}; each a difference of cell means (see the module docstring)."""
    r, e = data_levels
    f, lo = strategy_levels
    rf, rl, ef, el = c[r, f], c[r, lo], c[e, f], c[e, lo]
    return {
        "data": {ef: 0.5, rf: -0.5, el: 0.5, rl: -0.5},
        "strategy": {rl: 0.5, rf: -0.5, el: 0.5, ef: -0.5},
        "interaction": {el: 1.0, rl: -1.0, ef: -1.0, rf: 1.0},
        f"data_in_{f}": {ef: 1.0, rf: -1.0},
        f"data_in_{lo}": {el: 1.0, rl: -1.0},
        f"strategy_in_{r}": {rl: 1.0, rf: -1.0},
        f"strategy_in_{e}": {el: 1.0, ef: -1.0},
    }


def verdict(effect: str, called: bool, positive: bool, data_levels: list[str], strategy_levels: list[str]) -> str:
    """Plain words for one effect's interval."""
    if not called:
        return "no significant difference"
    if effect == "interaction":
        return f"the data effect is {'larger' if positive else 'smaller'} with {strategy_levels[1]}"
    low, high = data_levels if effect.startswith("data") else strategy_levels
    return f"{high} better" if positive else f"{low} better"
