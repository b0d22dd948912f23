#!/usr/bin/env bash
# The files the GPU scripts read from .carry/ (bench/run_grid_gpu.sh, bench/run_precision_gpu.sh,
# bench/probes/step_trace.py), made once per checkout on the developer machine, repo root:
#   bash bench/tools/carry.sh
# .carry/minilm        the embedded MiniLM as a model folder, fp16 weights (44 MiB)
# .carry/k-shot        SST-2, RTE and TREC 16-shot splits from ../shared/data (1.4 MiB)
# .carry/SST-2-16-42   the split bench/run_precision_gpu.sh reads
# Then pass carry [".carry"] to the device calls; a call's triton-cache.txz goes in .carry/ too.
set -euo pipefail
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo /.carry/ >> .git/info/exclude
mkdir -p .carry/k-shot
[ -d .carry/minilm ] || python3 bench/tools/precision.py pack-minilm .carry/minilm
for task in SST-2 RTE trec; do
  [ -d ".carry/k-shot/$task" ] || cp -r "../shared/data/k-shot/$task" .carry/k-shot/
done
[ -d .carry/SST-2-16-42 ] || cp -r ../shared/data/k-shot/SST-2/16-42 .carry/SST-2-16-42
du -sh .carry
