#!/usr/bin/env bash
# Where the rtn merge's start-up goes on the GPU machine (issue 21: whole 7B rtn <= 5 s): torch's import, the
# CUDA context, and a cProfile of the whole CLI on a 2-layer 7B checkpoint (run phases_7b.sh first: it builds
# it under /tmp/bs). Three rounds each; the profile of the last.
source bench/gpu/_setup.sh
CKPT=$(ls -d /tmp/bs/synthetic/7b-L2-* | head -1)
for i in 1 2 3; do
  /usr/bin/time -f "import torch: %e s" python3 -c "import torch" 2>&1 | tail -1
  /usr/bin/time -f "import torch + CUDA context: %e s" python3 -c "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()" 2>&1 | tail -1
  rm -rf /tmp/rtn-out
  /usr/bin/time -f "merge --method rtn (2 layers): %e s" python3 -m oftsurgery merge "$CKPT/gptq" "$CKPT"/rotations-*.safetensors \
      --out /tmp/rtn-out -q --method rtn --device cuda > /dev/null 2> /tmp/rtn-time.txt; tail -1 /tmp/rtn-time.txt
done
rm -rf /tmp/rtn-out
python3 -c "
import cProfile, pstats, sys, io
sys.argv = ['oftsurgery', 'merge', '$CKPT/gptq', '$(ls $CKPT/rotations-*.safetensors | head -1)', '--out', '/tmp/rtn-out', '-q', '--method', 'rtn', '--device', 'cuda']
from oftsurgery.cli.app import main
p = cProfile.Profile(); p.enable()
try:
    main(sys.argv[1:])
finally:
    p.disable(); s = io.StringIO(); pstats.Stats(p, stream=s).sort_stats('cumulative').print_stats(45); print(s.getvalue()[:9000])
" > "$OUT/rtn-profile.txt" 2>&1
head -80 "$OUT/rtn-profile.txt" | cut -c1-160
