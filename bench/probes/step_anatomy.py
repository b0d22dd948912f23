"""Why an exact-mode step costs more than two forwards (H200, issue 10): where it waits for the GPU
and where the GPU's time goes.

For LOZO, LOZO-M and MeZO in their default modes on an OPT shape (random bf16 weights):
1. syncs: one step under torch.cuda.set_sync_debug_mode("warn"); every synchronising call is
   listed with the zofast / bench frames of its stack, counted per distinct stack.
2. GPU time: three steps under torch.profiler beside three pairs of plain forwards; the GPU's
   busy time (sum of kernel times) against the wall time, and the kernels that take it.
Writes OUT/step_anatomy.txt.

Usage (GPU machine, repo root): python bench/probes/step_anatomy.py OUT [--model opt-1.3b]
[--batch 16] [--methods lozo lozo-m mezo]
"""

import argparse
import collections
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH / "tools"), str(BENCH / "suites")]
from precision import describe, finish, make_optimizer  # noqa: E402
from test_steps import random_opt  # noqa: E402


def ours(frame: traceback.FrameSummary) -> bool:
    return "zofast" in frame.filename or "/kernels/" in frame.filename


def sync_stacks(step) -> collections.Counter:
    """Distinct stacks (our frames only) of the calls that synchronise during one step."""
    stacks = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if ours(f)]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1])
        stacks[f"{str(message)[:60]} | {where or filename}"] += 1

    previous = warnings.showwarning
    warnings.showwarning = record
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = previous
    return stacks


def gpu_time(fn, calls=3):
    """(wall ms per call, GPU busy ms per call, [(kernel, ms per call)] top 15)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls * 1e3
    kernels = collections.Counter()
    launches = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name[:90]] += event.device_time / 1e3 / calls
            launches[event.name[:90]] += 1 / calls
    busy = sum(kernels.values())
    return wall, busy, [(k, ms, launches[k]) for k, ms in kernels.most_common(15)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="opt-1.3b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=["lozo", "lozo-m", "mezo"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    model, ids = random_opt(args.model, args.batch)

    @torch.no_grad()
    def closure():
        return model(input_ids=ids, labels=ids).loss

    def two_forwards():
        closure()
        closure()

    for _ in range(3):
        two_forwards()
    wall, busy, top = gpu_time(two_forwards)
    say(f"{args.model} b{args.batch}, two forwards: wall {wall:.2f} ms, GPU busy {busy:.2f} ms")
    base = wall
    for method in args.methods:
        opt = make_optimizer(method, model, 1e-7)
        step = lambda opt=opt: opt.step(closure)  # noqa: E731
        for _ in range(3):
            step()
        say(f"\n== {method} {describe(opt)}")
        for stack, count in sync_stacks(step).most_common(20):
            say(f"  sync x{count}: {stack}")
        wall, busy, top = gpu_time(step)
        say(f"  step: wall {wall:.2f} ms (÷ two forwards {wall / base:.2f}), GPU busy {busy:.2f}")
        for name, ms, n in top:
            say(f"    {ms:8.3f} ms  x{n:6.1f}  {name}")
        finish(opt)
    (args.out / "step_anatomy.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
