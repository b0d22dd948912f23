#!/usr/bin/env bash
# What the H200 runs for the committed results: build with CUDA, GPU tests, kernel benchmarks.
# Usage (on the GPU machine, repo root): OUT=/some/dir bash bench/run_gpu.sh [pytest -k filter]
# The precision evidence (step rows per optimizer and mode, MiniLM fp32 vs bf16) runs from
# bench/run_precision_gpu.sh.
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
python3 -m pip install --no-build-isolation --no-deps -q . >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python3 -P -c "import torch, triton, zofast._C as c; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, 'cuda ops:', c.has_cuda)"
python3 -P -m pytest tests/test_gpu.py tests/test_multi.py tests/test_virtual.py -q 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
# Two sessions, each writing its JSON, so that a cut-short run keeps the first half.
python3 -P -m pytest bench/suites/test_passes.py --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/passes.json" ${1:+-k "$1"} 2>&1 | tail -2
python3 -P -m pytest bench/suites/test_kernels.py --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/kernels.json" ${1:+-k "$1"} 2>&1 | tail -2
python3 bench/tools/report.py "$OUT"/passes.json "$OUT"/kernels.json --out "$OUT" \
  --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
