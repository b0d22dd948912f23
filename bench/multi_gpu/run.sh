#!/usr/bin/env bash
# Issue 12's runs on one host: dp.py and directions.py on 1, 2 and 4 GPUs, fsdp.py on 2 and 4
# (float32 shards where they fit, and bf16 shards on 4 beside the bf16 run on 2), then merge.py
# into OUT/multi_gpu.md, OUT/multi_gpu.json and bench/results/latest.json. NVLink multicast off.
#
# Usage (repo root):
#   OUT=/some/dir bash bench/multi_gpu/run.sh                    # H200s, NCCL (builds zofast first)
#   OUT=/some/dir KINDS="dp" GPUS="1 2" bash bench/multi_gpu/run.sh     # a part of it
#   OUT=/some/dir DRY=1 bash bench/multi_gpu/run.sh              # CPU, gloo, tiny shapes, 1-2 procs
# PYTHON: the interpreter (default python3); NO_BUILD=1 skips the build.
# KINDS: any of "dp directions fsdp" (default all); GPUS: the process counts (default "1 2 4";
# fsdp runs at those ≥ 2). A run that fails is reported and the others still run; the merge
# takes every JSON in OUT, so parts run separately merge together at the end.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
# The rows name the commit measured (bench/tools/precision.py run_meta reads COMMIT first).
export COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
HERE=bench/multi_gpu
KINDS=${KINDS:-dp directions fsdp}
mkdir -p "$OUT"
if [ -n "${DRY:-}" ]; then
  GPUS=${GPUS:-1 2}
  OPTS=(--backend gloo --device cpu --model tiny --batch 2 --seq 16 --steps 2 --runs 1)
  FSDP=(--check-model tiny)
else
  GPUS=${GPUS:-1 2 4}
  OPTS=()
  FSDP=()
  if [ -z "${NO_BUILD:-}" ]; then
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PYTHON -m pip install --no-build-isolation --no-deps -q . \
      >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  fi
  $PYTHON -P -c "import torch, zofast._C as c; print(torch.cuda.device_count(), 'GPUs', torch.cuda.get_device_name(), torch.__version__, 'cuda ops:', c.has_cuda)"
fi
failed=()
launch() {  # launch N SCRIPT TAG [ARGS...]: one torchrun, its log OUT/TAG-<N>gpu.log
  local n=$1 script=$2 log="$OUT/$3-${1}gpu.log"
  shift 3
  echo "== $script on $n: $*"
  $PYTHON -m torch.distributed.run --standalone --nproc-per-node "$n" "$HERE/$script" \
    --out "$OUT" "${OPTS[@]}" "$@" >"$log" 2>&1 || failed+=("$script on $n ($log)")
  grep -E "^kind=|^checks|Error" "$log" | tail -5
}
for n in $GPUS; do
  case " $KINDS " in *" dp "*) launch "$n" dp.py dp ;; esac
  case " $KINDS " in *" directions "*) launch "$n" directions.py directions ;; esac
  case " $KINDS " in *" fsdp "*)
    if [ "$n" -ge 2 ]; then
      launch "$n" fsdp.py fsdp "${FSDP[@]}"
      if [ "$n" -ge 4 ]; then launch "$n" fsdp.py fsdp-bf16 --shards bfloat16; fi
    fi
    ;;
  esac
done
LATEST=bench/results/latest.json
[ -n "${DRY:-}" ] && LATEST="$OUT/latest.json"
$PYTHON "$HERE/merge.py" "$OUT"/*-[0-9]gpu*.json --out "$OUT" --latest "$LATEST" || failed+=("merge")
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
