#!/usr/bin/env bash
# Which operators a 70B layer's solver stages spend their time in (issue 21: polish + refit add 4.8 s per
# 70B layer to a 2.3 s GPTQ pass): torch.profiler over each stage of one down_proj (8192 x 28672) and one
# gate/up_proj (28672 x 8192), 8192 tokens, after a warm-up round.
source bench/gpu/_setup.sh
for shape in 8192x28672 28672x8192; do
  timeout $((LIMIT - SECONDS)) python3 bench/stage_profile.py --shape $shape --device cuda --top 12 \
      > "$OUT/profile-$shape.txt" 2>&1
  grep -v "^USDT\|profiler_st" "$OUT/profile-$shape.txt" | grep -E "^## |^ +[a-zA-Z_:]" | head -70 | cut -c1-160
done
