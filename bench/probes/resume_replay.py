"""Do grid cells paused and resumed by replay end bit for bit as uninterrupted ones on the GPU,
and how fast is the replay (issue 15: cells that outlast one device call, zofast.train.pause)?

For each (method, dtype) of the grid's ZO cells (MiniLM, the modes "auto" resolves to, the grid's
batch and ε): one run of --steps uninterrupted, and the same run paused after the steps of
--pauses and resumed each time from the JSON state alone (a fresh model, weights rebuilt by
replay). Compared bit for bit: trajectory.json, trajectory-best.json, the log (timings aside),
best dev step and accuracy, test accuracy, the best weights. Then the replay rate: a
--replay-steps trajectory (the run's, extended with small random g's) replayed from the base
weights, seconds per step, beside the training seconds per step.
Writes OUT/resume_replay.json and prints it.

    python bench/probes/resume_replay.py OUT                      # the embedded MiniLM, demo data
    python bench/probes/resume_replay.py OUT --device cpu --steps 6 --pauses 2 4 --replay-steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ["mezo:float32", "lozo:float32", "lozo-m:float32", "mezo:bfloat16", "lozo:bfloat16",
         "lozo-m:bfloat16"]  # fmt: skip
TIMINGS = {"elapsed", "steps_per_s", "seconds", "train_seconds", "output_dir"}


def config(args, method: str, dtype: str, out: Path):
    from zofast.train import TrainConfig

    return TrainConfig(
        model=args.model, task=args.task, data=args.data, method=method, dtype=dtype,
        device=args.device, lr=args.lr, eps=1e-3, batch_size=16, steps=args.steps,
        eval_every=args.eval_every, log_every=args.eval_every, seed=13, output_dir=str(out),
        checkpoint_every=0, progress=False, plot=False, save_model=True,
        **({"rank": 2} if method != "mezo" else {}),
    )  # fmt: skip


def _after(steps):
    seen = {"n": 0}

    def stop():
        seen["n"] += 1
        return seen["n"] in steps

    return stop


def _log(path) -> list[dict]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMINGS} for x in lines]


def _weights(result) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{result.files['model']}/model.safetensors")


def case(args, method: str, dtype: str, root: Path) -> dict:
    import torch

    from zofast.models import load_model
    from zofast.train import train
    from zofast.train.pause import Paused, resume_paused

    a = train(config(args, method, dtype, root / "a"))
    stop = _after(args.pauses)
    out = train(config(args, method, dtype, root / "b"), stop=stop)
    pauses, state_bytes = [], 0
    while isinstance(out, Paused):
        text = json.dumps(out.state)
        pauses.append(out.steps)
        state_bytes = max(state_bytes, len(text))
        loaded = load_model(args.model, dtype=dtype, device=args.device)
        out = resume_paused(json.loads(text), loaded=loaded, stop=stop)
    b = out
    wa, wb = _weights(a), _weights(b)
    same = {
        "trajectory": Path(a.files["trajectory"]).read_bytes()
        == Path(b.files["trajectory"]).read_bytes(),
        "trajectory_best": Path(a.files["trajectory_best"]).read_bytes()
        == Path(b.files["trajectory_best"]).read_bytes(),
        "log": _log(a.files["log"]) == _log(b.files["log"]),
        "best": (a.best_step, a.best_dev, a.test) == (b.best_step, b.best_dev, b.test),
        "weights": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa),
    }
    return {
        "method": method,
        "dtype": dtype,
        "mode": config(args, method, dtype, root).resolved_mode,
        "steps": a.steps,
        "pauses": pauses,
        "bit_for_bit": all(same.values()),
        "same": same,
        "best_step": a.best_step,
        "test": [a.test, b.test],
        "paused_state_bytes": state_bytes,
        "train_ms_per_step": 1e3 * a.train_seconds / a.steps,
        **replay_rate(args, method, dtype, Path(a.files["trajectory"])),
    }


def replay_rate(args, method: str, dtype: str, path: Path) -> dict:
    """Seconds per replayed step: the run's trajectory extended to --replay-steps."""
    import numpy as np
    import torch

    from zofast import replay
    from zofast.models import load_model
    from zofast.trajectory import SETTLE, STEP, Trajectory

    run = Trajectory.load(path)
    long = Trajectory(run.method, run.hyperparameters, run.run_seed, run.n_groups)
    long.params, long.device = run.params, run.device
    steps = [(g, lrs, wds) for kind, g, lrs, wds in run.iter_events() if kind == STEP]
    _, lrs, wds = steps[0]
    g = np.random.default_rng(0).standard_normal(args.replay_steps).astype(np.float32) * 0.1
    for t in range(args.replay_steps):
        long.record_step(float(g[t]), lrs, wds)
        if t % args.eval_every == args.eval_every - 1:
            long.record(SETTLE)
    loaded = load_model(args.model, dtype=dtype, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    began = time.perf_counter()
    replay(loaded.model, long)
    sync()
    seconds = time.perf_counter() - began
    return {
        "replay_steps": args.replay_steps,
        "replay_ms_per_step": 1e3 * seconds / args.replay_steps,
    }


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--model", default=None, help="default: the embedded MiniLM")
    p.add_argument("--task", default="demo")
    p.add_argument("--data", default="demo")
    p.add_argument("--device", default="cuda")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--pauses", type=int, nargs="+", default=[15, 30])
    p.add_argument("--replay-steps", type=int, default=2000)
    p.add_argument("--cases", nargs="+", default=CASES)
    args = p.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in args.cases:
        method, dtype = item.split(":")
        with tempfile.TemporaryDirectory(prefix="resume-replay-") as folder:
            try:
                rows.append(case(args, method, dtype, Path(folder)))
            except Exception as error:  # noqa: BLE001 - report it, go on with the others
                rows.append({"method": method, "dtype": dtype, "error": repr(error)})
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    report = {
        "device": device, "torch": torch.__version__, "commit": _commit(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "cases": rows,
    }  # fmt: skip
    (out / "resume_replay.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    sys.exit(0 if all(r.get("bit_for_bit") for r in rows) else 1)


if __name__ == "__main__":
    main()
