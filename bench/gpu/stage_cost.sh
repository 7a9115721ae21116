#!/usr/bin/env bash
# What the fidelity stages cost per 7B decoder layer (issue 20): the default (20 tuning steps on a GPU) and
# --residual-rank 16 against --tune-steps 0, fitted over 1 and 2 layers, warmed; METHODS=... chooses.
source bench/gpu/_setup.sh
timeout $((LIMIT - SECONDS)) python3 bench/scale.py --preset 7b --layers 2 --depths 1,2 --vocab 4096 --device cuda \
    --methods "${METHODS:-calibrated+t0,calibrated,calibrated+r16}" --modes process --no-peer --keep-outputs \
    --workdir /tmp/bs --json "$OUT/stages.json" > "$OUT/stages.log" 2>&1
grep -A6 '^| run' "$OUT/stages.log"
for d in /tmp/bs/out-*; do [ -f "$d/merge_report.json" ] && cp "$d/merge_report.json" "$OUT/$(basename "$d")-report.json"; done
