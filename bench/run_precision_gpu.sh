#!/usr/bin/env bash
# The precision evidence on the H200, everything under $OUT:
#   steps   ZO step ÷ two forwards and peak ÷ forward for LOZO, LOZO-M and MeZO in each mode
#           (in place, shadow, virtual; default rounding; bf16) at the OPT-1.3B and 6.7B shapes
#           (bench/suites/test_steps.py rows "<method>-<mode>-bf16-b16"): steps.json, steps.md, latest.json
#   minilm  MiniLM on SST-2 16-shot seed 42, 5,000 steps, LOZO / LOZO-M / MeZO at lr 1e-5 and
#           2e-6, fp32 vs bf16 default vs bf16 in place (bench/tools/precision.py minilm): minilm/
#   all     both (default); each part is meant to fit one 10-minute device call.
# Usage (GPU machine, repo root): OUT=/some/dir bash bench/run_precision_gpu.sh [steps|minilm|all]
# Options (environment): SKIP_BUILD=1 (zofast already installed), MINILM (model folder,
#   default .carry/minilm), SST2 (data folder, default .carry/SST-2-16-42), JOBS (parallel
#   training processes, default 9), STEPS (training steps, default 5000), LRS (default
#   "1e-5 2e-6"; one lr per call fits 10 minutes: 18 processes at once took ~290 s for 5,000
#   fp32 steps and more than 320 s for bf16 on 2026-12-02), ZOFAST_STEP_DTYPES.
# The model and data do not travel by themselves (the float32 MiniLM file is 91 MB; ../shared is
# not sent). Once per checkout, on the developer machine, in the repo root:
#   bash bench/tools/carry.sh
# then run with carry [".carry"].
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
part=${1:-all}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export COMMIT
if [ -z "${SKIP_BUILD:-}" ]; then
  python3 -m pip install --no-build-isolation --no-deps -q . >"$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }
fi
python3 -P -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)"
status=0
if [ "$part" = steps ] || [ "$part" = all ]; then
  python3 -P -m pytest bench/suites/test_steps.py --benchmark-only -q -p no:cacheprovider \
    -k "(opt-1.3b or opt-6.7b) and (bf16 or fp16 or fp32)" \
    --benchmark-json="$OUT/steps.json" 2>&1 | tail -4 || status=1
  python3 bench/tools/report.py --steps "$OUT/steps.json" --out "$OUT" --commit "$COMMIT" || status=1
fi
if [ "$part" = minilm ] || [ "$part" = all ]; then
  python3 bench/tools/precision.py minilm --data "${SST2:-.carry/SST-2-16-42}" \
    --model "${MINILM:-.carry/minilm}" --jobs "${JOBS:-9}" --steps "${STEPS:-5000}" \
    --lrs ${LRS:-1e-5 2e-6} \
    --out "$OUT/minilm" >"$OUT/minilm.log" 2>&1 || { tail -20 "$OUT/minilm.log"; status=1; }
fi
# The short table, last.
if [ -f "$OUT/steps.md" ]; then
  echo; grep -E '^\| (model|opt-)' "$OUT/steps.md" | cut -d'|' -f2-8,11,14,16
fi
if [ -f "$OUT/minilm/minilm.md" ]; then
  echo; cat "$OUT/minilm/minilm.md"
fi
exit $status
