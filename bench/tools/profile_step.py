"""Where a ZO step's time goes on the GPU: torch.profiler over a few steps of an OPT-shaped model
(random weights, bf16), printing wall time per step, GPU-busy time per step (sum of kernel
times: the rest is the GPU waiting for the host) and the kernels that take the most time.

Usage (on a GPU machine): python bench/tools/profile_step.py [opt-1.3b] [batch]"""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from zofast.optim import LOZO, MeZO

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "suites"))
from test_steps import random_opt  # noqa: E402


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "opt-1.3b"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    model, ids = random_opt(name, batch)

    @torch.no_grad()
    def closure():
        return model(input_ids=ids, labels=ids).loss

    runs = [("mezo", MeZO, {}), ("lozo", LOZO, {"rank": 2})]
    runs.append(("lozo_virtual", LOZO, {"rank": 2, "mode": "virtual", "model": model}))
    for label, cls, kwargs in runs:
        opt = cls(model.parameters(), lr=1e-7, seed=1, pipeline=True, **kwargs)
        for _ in range(3):
            opt.step(closure)
        torch.cuda.synchronize()
        steps = 5
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                opt.step(closure)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / steps * 1e3
        averages = prof.key_averages()
        events = [e for e in averages if e.self_device_time_total > 0]
        busy = sum(e.self_device_time_total for e in events) / steps / 1e3
        print(f"{name} b{batch} {label}: wall {wall:.2f} ms/step, GPU busy {busy:.2f} ms/step")
        print("  GPU time by kernel:")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:8]:
            print(
                f"   {e.self_device_time_total / steps / 1e3:7.2f} ms  {e.count // steps:5d}x  "
                f"{e.key[:90]}"
            )
        print("  host time by op (self):")
        for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:10]:
            print(
                f"   {e.self_cpu_time_total / steps / 1e3:7.2f} ms  {e.count // steps:5d}x  "
                f"{e.key[:90]}"
            )
        opt.settle()
        if label == "lozo_virtual":
            opt.detach()


if __name__ == "__main__":
    main()
