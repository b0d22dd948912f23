"""How many MiniLM training steps per second one H200 gives the accuracy grid (issue 15).

Runs ``zofast.train`` on SST-2 16-shot (a k-shot folder), MiniLM, no evaluation but the last:
  single   each (method, dtype) alone: ms per step;
  profile  cProfile over --profile-steps steps of each (method, dtype): where the host time goes;
  parallel N processes at once (N in --procs), every one the same run: aggregate steps/s;
  mps      the same with the CUDA MPS daemon on (if nvidia-cuda-mps-control exists).
Writes throughput.json and profile_<method>-<dtype>.txt into OUT (run folders under /tmp).

    python bench/probes/grid_throughput.py OUT --model .carry/minilm --data .carry/SST-2-16-42
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def config(args, method: str, dtype: str, steps: int, out: str):
    from zofast.train import TrainConfig

    return TrainConfig(
        model=args.model,
        task="sst-2",
        data=args.data,
        method=method,
        steps=steps,
        eval_every=steps,
        dtype=dtype,
        device=args.device,
        output_dir=out,
        progress=False,
        plot=False,
        zero_shot_test=False,
        checkpoint_every=0,
        compile=args.compile,
    )


def one(args, method: str, dtype: str, steps: int, out: str, profile: str | None) -> dict:
    """One run in this process; with profile, the path of the profiler table to write."""
    import torch

    from zofast.train import train

    torch.set_num_threads(1)
    cfg = config(args, method, dtype, steps, out)
    if profile is None:
        result = train(cfg)
        return {"steps": result.steps, "train_s": result.train_seconds}
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    result = train(cfg)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumtime").print_stats("zofast", 40)
    Path(profile).write_text(text.getvalue())
    return {"steps": result.steps, "train_s": result.train_seconds}


def child(args) -> None:
    row = one(args, args.method, args.dtype, args.steps, args.child_out, args.profile)
    print("ROW " + json.dumps(row), flush=True)


def spawn(args, method, dtype, steps, out, profile=None, compiled=False):
    cmd = [sys.executable, __file__, args.out, "--model", args.model, "--data", args.data]
    cmd += ["--device", args.device] + (["--compile"] if compiled else [])
    cmd += ["--child", "--method", method, "--dtype", dtype, "--steps", str(steps)]
    cmd += ["--child-out", out] + (["--profile", profile] if profile else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def collect(proc) -> dict:
    text, _ = proc.communicate()
    for line in text.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    return {"error": text[-2000:]}


def parallel(args, n: int, method: str, dtype: str, tag: str) -> dict:
    began = time.perf_counter()
    procs = [
        spawn(args, method, dtype, args.steps, f"/tmp/zofast-gt/{tag}-{method}-{dtype}-{i}")
        for i in range(n)
    ]
    rows = [collect(p) for p in procs]
    wall = time.perf_counter() - began
    ok = [r for r in rows if "steps" in r]
    res = {"procs": n, "method": method, "dtype": dtype, "wall_s": wall, "ok": len(ok)}
    if ok:
        res["median_train_s"] = sorted(r["train_s"] for r in ok)[len(ok) // 2]
        res["aggregate_steps_per_s"] = sum(r["steps"] for r in ok) / max(r["train_s"] for r in ok)
    else:
        res["error"] = rows[0].get("error", "")[-600:]
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile-steps", type=int, default=200)
    p.add_argument(
        "--parallel-pairs", type=int, default=1, help="how many of --pairs the parallel parts run"
    )
    p.add_argument("--procs", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--pairs", nargs="+", default=["mezo:float32", "lozo:float32", "mezo:bfloat16"])
    p.add_argument("--parts", nargs="+", default=["single", "profile", "parallel", "mps"])
    p.add_argument("--child", action="store_true")
    p.add_argument("--method")
    p.add_argument("--dtype")
    p.add_argument("--child-out")
    p.add_argument("--profile")
    p.add_argument("--compile", action="store_true", help="(child) TrainConfig.compile")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # method:dtype, or method:dtype:compile for TrainConfig(compile=True)
    pairs = [tuple(s.split(":")) for s in args.pairs]
    report: dict = {"single": [], "parallel": [], "mps": []}
    if "single" in args.parts:
        for method, dtype, *flags in pairs:
            compiled = flags == ["compile"]
            folder = f"/tmp/zofast-gt/s-{method}-{dtype}-{len(flags)}"
            row = collect(spawn(args, method, dtype, args.steps, folder, compiled=compiled))
            row.update(method=method, dtype=dtype, compiled=compiled)
            if "steps" in row:
                row["ms_per_step"] = 1e3 * row["train_s"] / row["steps"]
            print(json.dumps(row), flush=True)
            report["single"].append(row)
    if "profile" in args.parts:
        for method, dtype, *_ in pairs:
            table = str(out / f"profile_{method}-{dtype}.txt")
            collect(
                spawn(args, method, dtype, args.profile_steps, f"/tmp/zofast-gt/p-{method}", table)
            )
    if "parallel" in args.parts:
        for method, dtype, *_ in pairs[: args.parallel_pairs]:
            for n in args.procs:
                report["parallel"].append(parallel(args, n, method, dtype, f"n{n}"))
    mps = shutil.which("nvidia-cuda-mps-control")
    if "mps" in args.parts and mps:
        env_dir = "/tmp/mps"
        os.makedirs(env_dir, exist_ok=True)
        os.environ["CUDA_MPS_PIPE_DIRECTORY"] = env_dir
        os.environ["CUDA_MPS_LOG_DIRECTORY"] = env_dir
        started = subprocess.run([mps, "-d"], capture_output=True, text=True)
        report["mps_start"] = started.returncode
        try:
            for method, dtype, *_ in pairs[: args.parallel_pairs]:
                for n in args.procs:
                    report["mps"].append(parallel(args, n, method, dtype, f"mps{n}"))
        finally:
            subprocess.run([mps], input="quit\n", text=True, capture_output=True)
    elif "mps" in args.parts:
        report["mps_start"] = "nvidia-cuda-mps-control not found"
    (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
