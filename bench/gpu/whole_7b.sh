#!/usr/bin/env bash
# The whole-process 7B table (issue 21): 2 and 32 decoder layers, rtn and calibrated, the peer beside them.
source bench/gpu/_setup.sh
timeout $((LIMIT - SECONDS)) python3 bench/scale.py --preset 7b --layers 32 --depths 2,32 --device cuda \
    --methods "${METHODS:-rtn,calibrated+t0,calibrated}" --modes process --workdir /tmp/bs --json "$OUT/scale-7b.json" > "$OUT/scale-7b.log" 2>&1
tail -20 "$OUT/scale-7b.log"
