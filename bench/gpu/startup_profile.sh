#!/usr/bin/env bash
# Where the rtn merge's start-up goes on the GPU machine (issue 21: whole 7B rtn <= 5 s): torch's import, the
# CUDA context, and a cProfile of the whole CLI (rtn, then calibrated) on a 2-layer 7B checkpoint (run phases_7b.sh first: it builds
# it under /tmp/bs). Three rounds each; the profile of the last.
source bench/gpu/_setup.sh
CKPT=$(ls -d /tmp/bs/synthetic/7b-L2-* | head -1)
for i in 1 2 3; do
  TIMEFORMAT="import torch: %R s"; time python3 -c "import torch"
  TIMEFORMAT="import torch + CUDA context: %R s"; time python3 -c "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
  rm -rf /tmp/rtn-out
  TIMEFORMAT="merge --method rtn (2 layers): %R s"
  time python3 -m oftsurgery merge "$CKPT/gptq" "$CKPT"/rotations-*.safetensors --out /tmp/rtn-out -q --method rtn \
      --device cuda > /dev/null 2>&1
done 2>&1
for method in rtn calibrated; do
rm -rf /tmp/prof-out
python3 -c "
import cProfile, pstats, sys, io
sys.argv = ['oftsurgery', 'merge', '$CKPT/gptq', '$(ls $CKPT/rotations-*.safetensors | head -1)', '--out', '/tmp/prof-out', '-q', '--method', '$method', '--device', 'cuda']
from oftsurgery.cli.app import main
p = cProfile.Profile(); p.enable()
try:
    main(sys.argv[1:])
finally:
    p.disable(); s = io.StringIO(); pstats.Stats(p, stream=s).sort_stats('cumulative').print_stats(70); print(s.getvalue()[:14000])
" > "$OUT/$method-profile.txt" 2>&1
grep -v "importlib\|builtins\|click/core" "$OUT/$method-profile.txt" | head -50 | cut -c1-150
done
