#!/usr/bin/env bash
# Fidelity at real width (issue 20): a hidden-2048 Llama trained here for a minute and a half, quantized by
# GPTQModel, fine-tuned with OFT, merged at 4096 calibration tokens (2 per input, what a 7B gets at 8192).
source bench/gpu/_setup.sh
timeout 200 python3 bench/wide_model.py --out /tmp/wide --minutes 1.5 --code-chars 2500000 --device cuda \
    > "$OUT/wide.log" 2>&1
tail -1 "$OUT/wide.log"
timeout $((LIMIT - SECONDS)) python3 bench/fidelity.py --workdir /tmp/fidw --fp-model /tmp/wide --device cuda \
    --formats gptq --methods calibrated --calib builtin:english --calib-tokens 4096 --residual-ranks 4 16 \
    --steps 40 --batch-size 4 --eval-tokens 4096 --no-full-requant > "$OUT/fid-wide.log" 2>&1
grep '^\[fidelity\]\|^|' "$OUT/fid-wide.log" | head -30
cp /tmp/fidw/fidelity.json "$OUT/" 2>/dev/null || true
