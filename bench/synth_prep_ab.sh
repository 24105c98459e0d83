#!/usr/bin/env bash
# Our captioning op with the first sub-batch of each call prepared in slices (today's op, `fast`) against
# every sub-batch prepared in one processor call (`fast_one_call`), in alternating processes so that host
# drift hits both alike. GPU machine, after bench/run_gpu.sh's install. Usage:
#   bash bench/synth_prep_ab.sh GPU_BATCH_SIZE OUTDIR [ROUNDS=2]
set -uo pipefail
B=$1; OUT=$2; ROUNDS=${3:-2}
mkdir -p "$OUT"
for r in $(seq "$ROUNDS"); do
  python3 bench/synth_captioner.py --stock "" --generate "" --fast-eager "" --fast "" --fast-one-call "$B" --out "$OUT/ab_one_$r.json" > "$OUT/ab_one_$r.log" 2>&1
  python3 bench/synth_captioner.py --stock "" --generate "" --fast-eager "" --fast "$B" --out "$OUT/ab_slices_$r.json" > "$OUT/ab_slices_$r.log" 2>&1
  for f in "$OUT/ab_one_$r.json" "$OUT/ab_slices_$r.json"; do
    python3 -c "import json, sys; [print(r['path'], r.get('captions_per_s'), r.get('prepare_s'), r.get('error', '')) for r in json.load(open(sys.argv[1]))['rows']]" "$f"
  done
done
