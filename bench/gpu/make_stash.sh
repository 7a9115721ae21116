#!/usr/bin/env bash
# Here (not on the GPU machine): pack what a GPU run needs but cannot build there into parts small enough
# to travel one per call (64 MiB per call, .gpuwheels included): an xz-compressed tar in 48 MiB parts. Default: SmolLM2's GPTQ 4-bit g128 sym
# checkpoint and the OFT adapter bench/fidelity.py trained on it (20 x 2 x 256 code tokens, lr 3e-4), the
# very inputs of the README's CPU fidelity rows, so smollm2_fidelity.sh merges the same model on the GPU.
#   bash bench/gpu/make_stash.sh [CHECKPOINT_DIR ADAPTER_DIR]
# writes .gpustash/all/part-NN and .gpustash/all/manifest; send part k in call k (see README.md here).
set -euo pipefail
CKPT=${1:-$HOME/.cache/oftsurgery/smollm2-135m-gptq-group_size128}
ADAPTER=${2:-$HOME/.cache/oftsurgery/bench-fidelity/adapter-trained-gptq-20x2-lr0.0003}
[ -f "$CKPT/model.safetensors" ] || { echo "no checkpoint at $CKPT (run bench/fidelity.py first)"; exit 1; }
[ -f "$ADAPTER/adapter_config.json" ] || { echo "no trained adapter at $ADAPTER (bench/fidelity.py --workdir ...)"; exit 1; }
rm -rf .gpustash/all && mkdir -p .gpustash/all .gpustash/send
tar -C "$(dirname "$CKPT")" -cf - --exclude quant_log.csv "$(basename "$CKPT")" \
    -C "$(dirname "$ADAPTER")" "$(basename "$ADAPTER")" | xz -6 -T2 -c | split -b 48M -d - .gpustash/all/part-
( cd .gpustash/all && sha256sum part-* > manifest && echo "checkpoint $(basename "$CKPT")" >> manifest \
  && echo "adapter $(basename "$ADAPTER")" >> manifest )
ls -la .gpustash/all
