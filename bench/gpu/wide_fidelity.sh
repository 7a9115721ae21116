#!/usr/bin/env bash
# Fidelity at real width (issue 20): a hidden-2048 Llama trained here (bench/wide_model.py, under 2 minutes on
# an H100, rebuilt only when its recipe changes), quantized by GPTQModel (GPTQ 4-bit g128 sym), fine-tuned
# with OFT on code, merged and evaluated on held-out code. 4096 calibration tokens are 2 per input, what a 7B
# gets at the default 8192. Set any of these to vary the grid (each value is one more merge, ~30 s):
#   CALIB="english code"  TOKENS="4096 16384"  TUNE="0 20"  RANKS="16"  METHODS="rtn calibrated"
#   MERGE_DEVICES="cuda cpu": each merge also on the machine's CPU cores (the CPU path, same model; slower)
#   EVAL_TOKENS=8192: held-out code tokens the perplexities are measured on
#   FORWARD_DTYPE=float32: the calibration forward in float32 on the GPU too (auto: the checkpoint's fp16)
#   DAMPS="0.01 0.1": the solver's damping, a row each (a bench knob; the merge uses 0.01)
#   SPREAD=0: skip the activation-spread table (bench/activation_spread.py, ~20 s)
#   TAG=b: suffix of the log and table under $OUT (several runs in one call)
#   SEEDS="0 1 2": one fine-tuned adapter per seed (a single instance's retention varies by points)
#   STEPS=20 BATCH=2: the OFT fine-tune, steps x rows of 256 code tokens (SmolLM2's recipe in the README;
#   the first wide run used STEPS=40 BATCH=4, which moves 2.7% of the codes where SmolLM2's moves ~1%)
source bench/gpu/_setup.sh
CALIB=${CALIB:-english code}; TOKENS=${TOKENS:-4096 16384}; TUNE=${TUNE:-0 20}; RANKS=${RANKS:-16}
METHODS=${METHODS:-rtn calibrated}; MERGE_DEVICES=${MERGE_DEVICES:-cuda}; EVAL_TOKENS=${EVAL_TOKENS:-8192}
STEPS=${STEPS:-20}; BATCH=${BATCH:-2}; SEEDS=${SEEDS:-0}; FORWARD_DTYPE=${FORWARD_DTYPE:-auto}
timeout 230 python3 bench/wide_model.py --out /tmp/wide --minutes 1.7 --device cuda > "$OUT/wide.log" 2>&1
tail -1 "$OUT/wide.log"
# a freshly trained model invalidates the bench's quantized checkpoint and adapter built from the last one
tail -1 "$OUT/wide.log" | grep -q '"cached": true' || rm -rf /tmp/fidw
# how anisotropic its inputs are beside SmolLM2's (bench/activation_spread.py; SPREAD=0 skips it)
[ "${SPREAD:-1}" = 0 ] || { timeout 90 python3 bench/activation_spread.py --model /tmp/wide --device cuda --tokens 4096 \
    --json "$OUT/spread-wide.json" > "$OUT/spread-wide$TAG.txt" 2>&1; grep '^|\|tokens of' "$OUT/spread-wide$TAG.txt"; }
timeout $((LIMIT - SECONDS)) python3 bench/fidelity.py --workdir /tmp/fidw --fp-model /tmp/wide --device cuda \
    --merge-devices $MERGE_DEVICES --forward-dtype $FORWARD_DTYPE --formats gptq --methods $METHODS --calib $(printf 'builtin:%s ' $CALIB) --calib-tokens $TOKENS \
    --tune-steps $TUNE --residual-ranks $RANKS --steps $STEPS --batch-size $BATCH --seeds $SEEDS ${DAMPS:+--damps $DAMPS} --eval-tokens $EVAL_TOKENS --no-full-requant \
    > "$OUT/fid-wide$TAG.log" 2>&1
grep '^\[fidelity\]' "$OUT/fid-wide$TAG.log" | head -40
sed -n "/Retention over adapter seeds/,\$p" "$OUT/fid-wide$TAG.log"
cp /tmp/fidw/fidelity.json "$OUT/fidelity-wide$TAG.json" 2>/dev/null || true
