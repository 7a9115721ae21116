#!/usr/bin/env bash
# The GPU path's fidelity on SmolLM2 (issue 20), on the same checkpoint and trained adapter as the README's
# CPU rows (bench/gpu/make_stash.sh packs them here; stash.sh collects the parts over consecutive calls).
# Merges on the GPU and on the machine's CPU cores side by side, evaluated alike on the GPU.
#   TOKENS="8192 1024"  TUNE="0 20"  RANKS="1 16"  MERGE_DEVICES="cuda cpu"
#   TAG=b: suffix of the log and table under $OUT (several runs in one call)
#   SEEDS="0 1 2": more adapters fine-tuned here from the same identity adapter (seed 0 is the stashed one)
#   KEEP_ADAPTERS=1: bring the adapters fine-tuned here back under $OUT (adapters-gpu.tar, ~9 MB each), so the
#   CPU can merge the very same fine-tunes (bench/fidelity.py --workdir W, unpacked into W)
source bench/gpu/_setup.sh
bash bench/gpu/stash.sh | grep -q "stash complete" || { echo "stash incomplete: send every part first"; exit 1; }
TOKENS=${TOKENS:-8192 1024}; TUNE=${TUNE:-0 20}; RANKS=${RANKS:-1 16}; MERGE_DEVICES=${MERGE_DEVICES:-cuda cpu}; SEEDS=${SEEDS:-0}
mkdir -p /tmp/smol /tmp/fids
unxz() { if command -v xz >/dev/null; then xz -dc; else python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)"; fi; }
[ -d /tmp/smol/done ] || { cat /tmp/stash/part-* | unxz | tar -C /tmp/smol -xf - && mkdir /tmp/smol/done; }
CKPT=/tmp/smol/$(awk '/^checkpoint /{print $2}' /tmp/stash/manifest)
ADAPTER=$(awk '/^adapter /{print $2}' /tmp/stash/manifest)
[ -d /tmp/fids/$ADAPTER ] || cp -r /tmp/smol/$ADAPTER /tmp/fids/
timeout $((LIMIT - SECONDS)) python3 bench/fidelity.py --workdir /tmp/fids --gptq-checkpoint "$CKPT" --device cuda \
    --merge-devices $MERGE_DEVICES --formats gptq --methods calibrated --calib builtin:english \
    --calib-tokens $TOKENS --seeds $SEEDS --tune-steps $TUNE --residual-ranks $RANKS --no-full-requant > "$OUT/fid-smol$TAG.log" 2>&1
grep '^\[fidelity\]' "$OUT/fid-smol$TAG.log" | head -40
sed -n "/Retention over adapter seeds/,\$p" "$OUT/fid-smol$TAG.log"
cp /tmp/fids/fidelity.json "$OUT/fidelity-smol$TAG.json" 2>/dev/null || true
[ "${KEEP_ADAPTERS:-0}" = 1 ] && ( cd /tmp/fids && ls -d adapter-trained-*-seed* >/dev/null 2>&1 \
    && tar -cf "$OUT/adapters-gpu.tar" adapter-trained-*-seed* && echo "adapters kept: $OUT/adapters-gpu.tar" ) || true
