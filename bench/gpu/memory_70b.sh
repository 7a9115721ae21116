#!/usr/bin/env bash
# A 70B-shaped decoder layer's calibrated merge (issue 21): peak GPU memory as nvidia-smi sees the process,
# judged against 48 GB, and the whole process against GPTQModel's (1 and 2 layers, both sides warmed; PEER_RUN=0
# leaves the peer out). BEFORE_TREE=DIR (a carried `git archive REV oftsurgery`
# unpacked there, e.g. .gpuwork/before) runs that code beside it on the same card.
source bench/gpu/_setup.sh
CODE=""
PEER="--peer --warmup"; [ "${PEER_RUN:-1}" = 0 ] && PEER="--no-peer --no-warmup"
if [ -n "$BEFORE_TREE" ] && [ -d "$BEFORE_TREE/oftsurgery" ]; then CODE="--code $BEFORE_TREE"; fi
timeout $((LIMIT - SECONDS)) python3 bench/scale.py --preset 70b --layers 2 --depths 1,2 --vocab 4096 --device cuda \
    --methods "${METHODS:-calibrated+t0,calibrated}" --modes process $PEER --gpu-budget-gb 48 $CODE --workdir /tmp/bs70 \
    --json "$OUT/scale-70b.json" > "$OUT/scale-70b.log" 2>&1
tail -30 "$OUT/scale-70b.log"
