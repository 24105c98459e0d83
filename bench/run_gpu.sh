#!/usr/bin/env bash
# All GPU benchmarks in one go (one H200, no internet there). Usage: bench/run_gpu.sh smoke|full OUTDIR
# A third argument picks benchmarks: bench/run_gpu.sh full OUT model,generate (default: all five).
# Missing packages travel as wheels in .whl/ (see README "Benchmarks"): transformers/peft pins,
# liger-kernel, pydantic + hjson and deepspeed's sdist, Data-Juicer and its small deps.
set -uo pipefail
mode=${1:-smoke}; out=${2:-bench/out}; only=${3:-model,generate,parts,train,synth}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/djwhl/*.whl \
    && export PYTHONPATH=/tmp/site
  if [[ ,$only, == *,train,* ]]; then
    DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz \
      > "$out/deepspeed_install.log" 2>&1 || echo "deepspeed install failed (see deepspeed_install.log)"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
run() { local name=$1; shift; [[ ,$only, == *,$name,* ]] || return 0; echo "=== $name: $*"; local t0=$SECONDS; timeout "${BENCH_TIMEOUT:-900}" python3 "$@" > "$out/$name.log" 2>&1; echo "rc=$? $((SECONDS-t0))s"; tail -n 25 "$out/$name.log"; }
if [[ $mode == smoke ]]; then
  run model    bench/model_fwd_bwd.py --steps 1 --warmup 1 --batch-size 4 --out "$out/model.json"
  run generate bench/generate.py --n 64 --n-batch1 4 --batch-size 32 --repeats 1 --out "$out/generate.json"
  run parts    bench/generate_parts.py --images 4 --prefixes 8 --no-compile --out "$out/parts.json"
  run train    bench/train_throughput.py --steps 2 --warmup 1 --out "$out/train.json"
  run synth    bench/synth_captioner.py --stock 8 --generate 8 --fast 8 --fast-eager 8 --images 16 --out "$out/synth.json"
else
  run model    bench/model_fwd_bwd.py --out "$out/model.json"
  run generate bench/generate.py --breakdown --cudnn-benchmark --out "$out/generate.json"
  run parts    bench/generate_parts.py --out "$out/parts.json"
  run train    bench/train_throughput.py --profile "$out/train_profile.txt" --out "$out/train.json"
  run synth    bench/synth_captioner.py --checks --stock 64 --generate 256 --fast 256,512 --fast-eager 256 --profile 256 --out "$out/synth.json"
fi
