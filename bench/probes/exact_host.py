"""Where an exact-mode step's time goes (H200): host time per step against GPU time, and the
Python functions that take the host's time (cProfile), for LOZO / LOZO-M / MeZO in their default
and shadow modes on an OPT shape (random bf16 weights, batch 16×256), beside the plain forward.

Usage (GPU machine, repo root): python bench/probes/exact_host.py [opt-1.3b] [batch]"""

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH / "tools"), str(BENCH / "suites")]
from precision import describe, finish, make_optimizer  # noqa: E402
from test_steps import random_opt  # noqa: E402


def timed(fn, calls=5):
    """(host ms per call: until fn returns, GPU ms per call: events around the calls)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3
    end.record()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls * 1e3
    return host, start.elapsed_time(end) / calls, wall


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "opt-1.3b"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    model, ids = random_opt(name, batch)

    @torch.no_grad()
    def closure():
        return model(input_ids=ids, labels=ids).loss

    for _ in range(3):
        closure()
    host, gpu, wall = timed(closure)
    fwd = wall
    print(f"{name} b{batch} forward: host {host:.2f} ms, GPU {gpu:.2f} ms, wall {wall:.2f} ms")
    runs = [
        ("lozo", None),
        ("lozo", "shadow"),
        ("lozo-m", None),
        ("lozo-m", "shadow"),
        ("mezo", None),
    ]
    for method, mode in runs:
        opt = make_optimizer(method, model, 1e-7, mode=mode)
        step = lambda opt=opt: opt.step(closure)  # noqa: E731
        for _ in range(3):
            step()
        host, gpu, wall = timed(step)
        label = f"{method} {describe(opt)}"
        print(
            f"{label}: step host {host:.2f} ms, GPU {gpu:.2f}, wall {wall:.2f} "
            f"(÷ 2 fwd {wall / (2 * fwd):.2f})"
        )
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
        print("\n".join(s.getvalue().splitlines()[6:32]))
        finish(opt)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
