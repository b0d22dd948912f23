"""Timelines of ZO steps where the GPU waits for the host (H200; issues 10 and 15): torch.profiler
traces (CPU ops with their Python stacks, GPU kernels) of
  opt   OPT-1.3B shape, random bf16 weights, batch 16×256: LOZO, LOZO-M and MeZO in their default
        (exact) modes, two steps each after a warm-up;
  minilm  `zofast.train` on SST-2 16-shot, the grid's settings
          (--minilm method:dtype[:compile][:hooks][:shadow]): the time of steps 100-300, then a
          trace of three steps.
Writes OUT/<name>.json.gz (chrome traces, for bench/tools/trace_gaps.py) and OUT/summary.txt (per
trace: wall time, GPU busy time, the GPU's idle gaps ≥ 0.1 ms and what the host ran meanwhile).

Usage (GPU machine, repo root): python bench/probes/step_trace.py OUT [--parts opt minilm]
[--model .carry/minilm] [--data .carry/k-shot/SST-2/16-42]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH / "tools"), str(BENCH / "suites")]
from precision import finish, make_optimizer  # noqa: E402
from test_steps import random_opt  # noqa: E402
from trace_gaps import export, summarise  # noqa: E402


def save(prof, out: Path, name: str) -> Path:
    return export(prof, out / f"{name}.json.gz")


def traced(fn, calls: int):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as p:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return p


def opt_traces(out: Path, say) -> None:
    model, ids = random_opt("opt-1.3b", 16)

    @torch.no_grad()
    def closure():
        return model(input_ids=ids, labels=ids).loss

    def two_forwards():
        closure()
        closure()

    for _ in range(3):
        two_forwards()
    say(summarise(save(traced(two_forwards, 2), out, "opt-forwards"), "two forwards"))
    for method in ("lozo", "lozo-m", "mezo"):
        opt = make_optimizer(method, model, 1e-7)
        for _ in range(3):
            opt.step(closure)
        path = save(traced(lambda opt=opt: opt.step(closure), 2), out, f"opt-{method}")
        say(summarise(path, f"{method} {opt.mode}"))
        finish(opt)


def minilm_traces(out: Path, say, args) -> None:
    """Per configuration ``method:dtype[:compile][:hooks][:shadow]``: the untraced time of steps
    100-300 (past the one-time compiles) and a trace of steps 300-303. ``hooks``: shadow mode's
    per-module hooks as on a large model (zofast.optim.shadow.PRESET_ALL_NUMEL = 0), for the
    comparison; ``shadow``: mode "shadow" (default: "auto")."""
    import time

    from zofast.optim import shadow
    from zofast.train import TrainConfig, train

    all_presets = shadow.PRESET_ALL_NUMEL

    for spec in args.minilm:
        method, dtype, *flags = spec.split(":")
        name = f"minilm-{method}-{dtype}" + "".join(f"-{flag}" for flag in flags)
        shadow.PRESET_ALL_NUMEL = 0 if "hooks" in flags else all_presets
        state = {"steps": 0, "prof": None, "t": 0.0}

        def stop(state=state, name=name):
            state["steps"] += 1
            if state["steps"] in (100, 300):
                torch.cuda.synchronize()
                now = time.perf_counter()
                if state["steps"] == 300:
                    say(f"{name}: {(now - state['t']) * 5:.2f} ms a step (steps 100-300, untraced)")
                state["t"] = now
            if state["steps"] == 300:
                state["prof"] = profile(
                    activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True
                )
                state["prof"].__enter__()
            if state["steps"] == 303:
                torch.cuda.synchronize()
                state["prof"].__exit__(None, None, None)
                say(summarise(save(state["prof"], out, name), f"{name}, 3 steps"))
            return False

        config = TrainConfig(
            model=args.model, task="sst-2", data=args.data, method=method, dtype=dtype,
            device="cuda", lr=1e-5, eps=1e-3, batch_size=16, steps=310, eval_every=310,
            log_every=310, seed=13, output_dir=tempfile.mkdtemp(), checkpoint_every=0,
            progress=False, plot=False, zero_shot_test=False, compile="compile" in flags,
            mode="shadow" if "shadow" in flags else "auto",
            **({"rank": 2} if method != "mezo" else {}),
        )  # fmt: skip
        train(config, stop=stop)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--parts", nargs="+", default=["opt", "minilm"])
    parser.add_argument("--model", default=".carry/minilm")
    parser.add_argument("--data", default=".carry/k-shot/SST-2/16-42")
    parser.add_argument(
        "--minilm",
        nargs="+",
        default=["mezo:float32", "mezo:bfloat16", "lozo:bfloat16"],
        help="method:dtype[:compile][:hooks][:shadow] configurations",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []

    def say(text):
        print(text, flush=True)
        lines.append(text)
        (args.out / "summary.txt").write_text("\n".join(lines) + "\n")

    if "opt" in args.parts:
        opt_traces(args.out, say)
    if "minilm" in args.parts:
        minilm_traces(args.out, say, args)


if __name__ == "__main__":
    main()
