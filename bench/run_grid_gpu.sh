#!/usr/bin/env bash
# One device call of the accuracy grid (issue 15; zofast/grid) on the H200, everything under $OUT:
#   runs.jsonl         the records of the cells finished (or stopped, to resume) in this call
#   grid.log           the runner's progress
#   triton-cache.txz   Triton's and torch.compile's compiled kernels (triton/, inductor/), on the
#                      first call only: keep it in .carry/triton-cache.txz and the next calls skip
#                      ~20-30 s of compiling per kernel set (every worker would otherwise compile
#                      the same kernels at once)
# Usage (GPU machine, repo root; carry [".carry"]):
#   COMMIT=<hash> STAGE=select OUT=/some/dir bash bench/run_grid_gpu.sh
# Options (environment): STAGE (select | final), WORKERS (default 16), DEADLINE / END (seconds
#   after the runner starts: no new cell after DEADLINE, every cell stopped by END; defaults 420 /
#   530 fit a 600 s call with the install), EXTRA (more arguments for `python -m zofast.grid run`,
#   e.g. "--scale 0.05" for a rehearsal or "--tasks sst-2"); COMPILE (default 1: the float32 ZO
#   cells run torch.compile'd, `run --compile`: MeZO 12.0 -> 6.7 ms a step, one process,
#   bench/results/2026-12-03-session8; 0: eager).
# The model and data do not travel by themselves. Once per checkout, on the developer machine, in
# the repo root: bash bench/tools/carry.sh
# The records come back in $OUT/runs.jsonl: commit it as bench/results/grid-h200/<stage>-<n>.jsonl.
set -uo pipefail
CACHE=/tmp/zofast-caches
# One compile thread per worker: 16 workers on 16 cores already compile at once.
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor
export TORCHINDUCTOR_COMPILE_THREADS=1
: "${COMMIT:?set COMMIT to the commit of this tree}"
STAGE=${STAGE:-select}
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
if [ -f .carry/triton-cache.txz ]; then tar xJf .carry/triton-cache.txz -C "$CACHE"; fi
compile=()
if [ "${COMPILE:-1}" = 1 ]; then compile=(--compile); fi
ZOFAST_NO_EXTENSION=1 python3 -m pip install --no-build-isolation --no-deps -q . >/tmp/build.log 2>&1 \
  || { tail -30 /tmp/build.log; exit 1; }
# CUDA MPS lets the workers' small kernels share the GPU instead of time-slicing it (MiniLM, 8
# processes: 309 steps/s in aggregate with MPS against 207 without, bench/results/2026-12-03-session7).
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps
mkdir -p /tmp/mps
mps=0
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then mps=1; fi
echo "MPS: $mps"
python3 -P -m zofast.grid run --stage "$STAGE" --device cuda --workers "${WORKERS:-16}" \
  --deadline "${DEADLINE:-420}" --end "${END:-530}" --data-root .carry/k-shot \
  --model .carry/minilm --commit "$COMMIT" --out "$OUT/runs.jsonl" "${compile[@]}" ${EXTRA:-} \
  >"$OUT/grid.log" 2>&1
status=$?
if [ "$mps" = 1 ]; then echo quit | nvidia-cuda-mps-control; fi
if [ ! -f .carry/triton-cache.txz ]; then tar cJf "$OUT/triton-cache.txz" -C "$CACHE" .; fi
tail -25 "$OUT/grid.log"
exit $status
