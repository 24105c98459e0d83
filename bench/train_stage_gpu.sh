#!/usr/bin/env bash
# The train stage itself at mgm-2b shapes on one GPU, through DVC (issue #12): a random-init mgm-2b zoo
# (zoo.source=random) on the tiny world's data (its 96 px images seen at 336 / 768 px), then
#   dvc repro train@baseline train@raw_lora        (stage 1, stage 2 full; stage 1, stage 2 LoRA r128)
# and the bench's `ours` rows (bench/train_throughput.py, the same code outside DVC) at the sequence
# lengths the stage saw, on the same card: metrics/train/<run>.json's samples/s vs the bench's.
#
#   bash bench/train_stage_gpu.sh OUT        # on the GPU host, from the repo root (carry .whl)
#   PRESET=tiny bash bench/train_stage_gpu.sh OUT   # the same steps on a CPU (a copy of the repo: it edits params.yaml)
#
# The GPU run's params are set in params.yaml as `dvc exp run -S` would; --no-commit keeps the 12 GB
# zoo out of DVC's cache. Wheels: .whl/ (transformers, peft, liger) and .whl/dvcwhl (dvc, dvclive, fire).
set -uo pipefail
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false DVC_NO_ANALYTICS=1
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl/djwhl/*.whl .whl/dvcwhl/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH || exit 1
fi
command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python  # dvc.yaml runs `python`
[[ -d .git ]] || python3 -m dvc config --local core.no_scm true   # a copy without git history
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo cpu; } | tee "$out/gpu.txt"
python3 - <<'EOF'
import os, yaml
p = yaml.safe_load(open("params.yaml"))
p["model"]["preset"] = os.environ.get("PRESET", "mgm-2b")
p["zoo"].update(source="random", threads=16)
p["world"].update(raw_size=int(os.environ.get("SAMPLES", 1000)), instruct_size=int(os.environ.get("SAMPLES", 1000)))  # 63 steps a stage at batch 16
p["train"].update(stage1_global_batch=16, stage1_micro_batch=16, stage2_global_batch=16, stage2_micro_batch=16,
                  save_steps=0)                            # the bench's batch; no 30 GB optimizer checkpoints
p["runs"]["baseline"]["lr"] = 2e-5                        # MGM-2B's full fine-tune lr
p["runs"]["raw_lora"].update(lr=2e-4, lora_r=128, lora_alpha=256)   # MGM's LoRA rank on 2B (the bench's)
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
EOF
t0=$SECONDS
runs=${RUNS:-baseline raw_lora}   # RUNS=baseline: one of them
timeout "${REPRO_TIMEOUT:-400}" python3 -m dvc repro --no-commit $(printf 'train@%s ' $runs) > "$out/repro.log" 2>&1
rc=$?; echo "dvc repro: rc=$rc $((SECONDS-t0)) s"; grep -E "^(zoo|train@)|Error|error" "$out/repro.log" | tail -20
got=$(mktemp -d)  # this run's metrics and per-step rows only (a time-out while DVC hashes the outputs keeps them)
for run in $runs; do
  [[ metrics/train/$run.json -nt "$out/gpu.txt" ]] || continue
  cp "metrics/train/$run.json" "$got/metrics_$run.json"
  mkdir "$got/$run" && cp plots/train/$run/plots/metrics/{stage,step_s,samples_per_s,tokens_per_s}.tsv "$got/$run/"
done
first=$(ls "$got"/metrics_*.json 2>/dev/null | head -1); [[ -n $first ]] || exit 1
# the bench at the mean (padded) tokens per sample each stage saw, so both time the same work
read -r s1 s2 < <(python3 -c '
import json; m = json.load(open("'"$first"'"))
print(*(round(m[s]["tokens"] / m[s]["samples"]) for s in ("stage1", "stage2")))') || exit 1
bench() {  # bench MODES SEQ NAME LIMIT_S
  timeout "$4" python3 bench/train_throughput.py --preset "${PRESET:-mgm-2b}" --batch 16 --lora_r 128 --rows ours \
    --modes "$1" --seq "$2" --out "$out/bench_$3.json" > "$out/bench_$3.log" 2>&1; echo "bench $3: rc=$?"
}
summarise() {
python3 - "$out" "$got" <<'EOF'
import csv, json, sys
from pathlib import Path
out, got = Path(sys.argv[1]), Path(sys.argv[2])
bench = {r["mode"]: r for f in ("bench_stage1.json", "bench_stage2.json") if (out / f).is_file()
         for r in json.loads((out / f).read_text())["rows"]}
rows = []
for run, mode in (("baseline", "stage1"), ("baseline", "full"), ("raw_lora", "stage1"), ("raw_lora", "lora")):
    f = got / f"metrics_{run}.json"
    if not f.is_file():
        continue
    s = json.loads(f.read_text())["stage1" if mode == "stage1" else "stage2"]
    b = bench.get(mode, {})
    rows.append({"run": run, "step": mode, "stage_samples_per_s": s["samples_per_s"], "stage_tokens_per_s": s["tokens_per_s"],
                 "tokens_per_sample": round(s["tokens"] / s["samples"], 1), "bench_samples_per_s": b.get("samples_per_s"),
                 "bench_seq": b.get("seq"), "stage_vs_bench": round(s["samples_per_s"] / b["samples_per_s"], 3)
                 if b.get("samples_per_s") else None})
    print(rows[-1])
def steps(run):  # dvclive's per-step rows: one TSV (step, value) a metric
    cols = {}
    for name in ("stage", "step_s", "samples_per_s", "tokens_per_s"):
        with open(got / run / f"{name}.tsv") as f:
            cols[name] = [(int(r[0]), float(r[1])) for r in list(csv.reader(f, delimiter="\t"))[1:]]
    return [{"step": step, **{k: v[i][1] for k, v in cols.items()}} for i, (step, _) in enumerate(cols["stage"])]
runs = [r for r in ("baseline", "raw_lora") if (got / f"metrics_{r}.json").is_file()]
(out / "train_stage_gpu.json").write_text(json.dumps({
    "gpu": (out / "gpu.txt").read_text().strip(), "rows": rows,
    "metrics": {r: json.loads((got / f"metrics_{r}.json").read_text()) for r in runs},
    "steps": {r: steps(r) for r in runs}}, indent=1) + "\n")
EOF
}
bench "${BENCH2_MODES:-full,lora}" "$s2" stage2 "${BENCH2_TIMEOUT:-150}"; summarise
(( ${BENCH1_TIMEOUT:-90} > 0 )) && { bench stage1 "$s1" stage1 "${BENCH1_TIMEOUT:-90}"; summarise; }
