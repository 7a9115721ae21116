#!/usr/bin/env bash
# Where a calibrated merge's time goes per 7B decoder layer (issue 21): 2 layers, warmed, no peer, every
# phase waiting for the GPU at its end (OFTSURGERY_PHASE_SYNC=1) so the GPU's time lands in the phase that
# queued it; the table is merge_report.json's phase_seconds per decoder layer.
source bench/gpu/_setup.sh
OFTSURGERY_PHASE_SYNC=1 timeout $((LIMIT - SECONDS)) python3 bench/scale.py --preset 7b --layers 2 --depths 1,2 \
    --vocab 4096 --device cuda --methods calibrated --modes process --no-peer --workdir /tmp/bs \
    --json "$OUT/phases-7b.json" > "$OUT/phases-7b.log" 2>&1
grep -A30 '^Where our merge' "$OUT/phases-7b.log"
