"""Precision evidence for zeroth-order training in bf16 / fp16: does a run in low precision go
where its float32 twin goes, per optimizer (MeZO, LOZO, LOZO-M) and mode (in place, shadow,
virtual)? Each experiment writes JSON (commit, torch / triton versions, device, the rows) and
prints a markdown table.

  teacher  a 256×256 Linear (no bias) regressed onto a teacher = its start + a rank-2 shift
           (mean-squared error on fixed random inputs, fixed seeds), in float32 (in place), bf16
           with the optimizers' DEFAULT settings, and bf16 forced in place (stochastic and
           nearest rounding) for contrast. Reported: start and final loss, both evaluated in
           float32 at the settled stored weights, and the bf16 run's loss reduction as a fraction
           of its float32 twin's. CPU, about a minute.
  drift    the lr = 0 drift (FACTS §3, §8): a 512×512 Linear, 1000 steps with every group's lr
           set to 0 after construction, relative change ‖W − W₀‖ / ‖W₀‖ and the fraction of
           entries changed, per optimizer, mode and dtype (bf16, fp16). An exact mode gives 0.
           CPU, about 3 minutes on 2 cores (--size 256 is 4x faster).
  minilm   the embedded all-MiniLM-L6-v2 on SST-2 16-shot (seed 42) through zofast.train's own
           train(): LOZO, LOZO-M (momentum 0.9) and MeZO at lr 1e-5 and 2e-6, float32 vs bf16
           default vs bf16 in place, 5,000 steps; final training loss (mean of the logged losses
           of the last 500 steps), dev accuracy and test accuracy of the best dev checkpoint.
           Runs in parallel processes (--jobs, spawn); meant for the GPU (--steps 5 smoke-tests
           it on a CPU).
  pack-minilm  writes the embedded MiniLM as a model folder with float16 weights (46 MB: the
           float32 file, 91 MB, is over what a device call carries); every minilm variant then
           starts from the same fp16-rounded weights.

Usage:
  python bench/tools/precision.py teacher [--steps N] [--methods mezo lozo lozo-m] [--out F.json]
  python bench/tools/precision.py drift [--dtypes bfloat16 float16] [--steps 1000] [--out F.json]
  python bench/tools/precision.py minilm --data DIR [--model DIR] [--jobs 9] [--steps N] [--out D]
  python bench/tools/precision.py pack-minilm DIR

Optimizer keyword arguments that this build lacks (an older zofast without mode="shadow" or
rounding=) are left out where the older default means the same ("inplace", "nearest"); other
rows print as unsupported. Functions here are imported by tests/test_precision.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("mezo", "lozo", "lozo-m")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
LOZO_M_MOMENTUM = 0.9


class Unsupported(Exception):
    """The asked-for mode does not exist for this optimizer (MeZO has no virtual mode)."""


# The optimizers.


def make_optimizer(
    method: str,
    model: torch.nn.Module,
    lr: float,
    *,
    mode: str | None = None,
    rounding: str | None = None,
    eps: float = 1e-3,
    seed: int = 1,
    rank: int = 2,
    nu: int = 50,
    momentum: float = LOZO_M_MOMENTUM,
    pipeline: bool = False,
    accumulate: int | None = None,
    paired: bool = False,
):
    """MeZO / LOZO / LOZO-M (`momentum`) on `model` (passed as the params: exact modes need it).

    mode / rounding / accumulate None = the optimizer's default; paired: LOZO's paired steps
    (its closure returns (L+, L−) of the batch stacked twice). Raises Unsupported when this
    optimizer has no such mode or rounding."""
    from zofast.optim import LOZO, MeZO

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cls = MeZO if method == "mezo" else LOZO
    kwargs = {"lr": lr, "eps": eps, "seed": seed, "pipeline": pipeline}
    if cls is LOZO:
        kwargs.update(rank=rank, nu=nu, momentum=momentum if method == "lozo-m" else 0.0)
    for name, value in (("mode", mode), ("rounding", rounding), ("accumulate", accumulate)):
        if value is not None:
            kwargs[name] = value
    if paired:
        kwargs["paired"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 in place warns: the contrast rows ask for it
            return cls(model, **kwargs)
    except ValueError as error:
        if mode is not None and "mode" in str(error):
            raise Unsupported(str(error)) from None
        raise


def describe(opt) -> dict:
    """The resolved mode, rounding and exactness of an optimizer."""
    return {"mode": opt.mode, "rounding": opt.rounding, "exact": opt.exact}


def zero_lr(opt) -> None:
    """lr = 0 in every group (a scheduler may do this; the constructor wants lr > 0)."""
    for group in opt.param_groups:
        group["lr"] = 0.0


def finish(opt) -> None:
    """Settle and take the hooks off (in place: settle only): the stored weights are the
    iterate."""
    opt.settle()
    if describe(opt)["mode"] != "inplace":
        opt.detach()


# Provenance.


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def run_meta(device: str = "cpu") -> dict:
    """Commit, versions and device of a measurement."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    return {
        "commit": os.environ.get("COMMIT") or _git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if on_cuda else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
    }


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {path}")


def _fmt(value, spec: str = ".3e") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


# teacher: a teacher–student regression.


@dataclasses.dataclass
class TeacherConfig:
    """A size×size Linear (no bias) regressed onto w₀ + shift·a·bᵀ (a, b: size×2 normals) on
    `inputs` fixed normal inputs. Few inputs keep the dimensions the loss sees (size·inputs) few
    enough for a ZO run to make clear progress in a CPU-friendly number of steps; lr 1e-4 keeps
    every update lr·g·z below half a bf16 spacing of the weights (~|w| / 256), the regime of real
    runs where round-to-nearest drops updates and the in-place walk dominates."""

    size: int = 256
    inputs: int = 1
    shift: float = 0.01
    lr: float = 1e-4
    steps: int = 1500
    eps: float = 1e-3
    seed: int = 0


TEACHER_VARIANTS = {
    # name: (dtype, mode, rounding); None = the optimizer's default
    "fp32": ("float32", None, None),
    "bf16": ("bfloat16", None, None),
    "bf16-inplace": ("bfloat16", "inplace", None),
    "bf16-inplace-nearest": ("bfloat16", "inplace", "nearest"),
    "bf16-shadow-nearest": ("bfloat16", "shadow", "nearest"),
    "bf16-virtual": ("bfloat16", "virtual", None),
}


def teacher_problem(cfg: TeacherConfig):
    """(w0, x, y): start weights (float32 values that bf16 holds exactly, so every dtype starts
    from the same numbers), inputs and teacher outputs, all float32."""
    gen = torch.Generator().manual_seed(cfg.seed)
    bound = 1 / math.sqrt(cfg.size)  # nn.Linear's init range
    w0 = ((torch.rand(cfg.size, cfg.size, generator=gen) * 2 - 1) * bound).bfloat16().float()
    a = torch.randn(cfg.size, 2, generator=gen)
    b = torch.randn(cfg.size, 2, generator=gen)
    x = torch.randn(cfg.inputs, cfg.size, generator=gen)
    y = x @ (w0 + cfg.shift * a @ b.T).T
    return w0, x, y


def teacher_loss(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean-squared error in float32 at the given stored weight."""
    return float(((x @ weight.detach().float().T - y) ** 2).mean())


def teacher_run(
    method: str,
    dtype: str = "float32",
    mode: str | None = None,
    rounding: str | None = None,
    cfg: TeacherConfig | None = None,
    accumulate: int | None = None,
) -> dict:
    """One student run; start / final loss in float32 at the settled stored weights."""
    cfg = cfg or TeacherConfig()
    w0, x, y = teacher_problem(cfg)
    model = torch.nn.Linear(cfg.size, cfg.size, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0)
    model.to(DTYPES[dtype])
    x_in = x.to(DTYPES[dtype])
    opt = make_optimizer(
        method,
        model,
        cfg.lr,
        mode=mode,
        rounding=rounding,
        eps=cfg.eps,
        seed=cfg.seed + 1,
        accumulate=accumulate,
    )

    def closure():
        return ((model(x_in).float() - y) ** 2).mean()

    start = teacher_loss(model.weight, x, y)
    began = time.perf_counter()
    for _ in range(cfg.steps):
        opt.step(closure)
    finish(opt)
    seconds = time.perf_counter() - began
    final = teacher_loss(model.weight, x, y)
    return {
        "method": method,
        "dtype": dtype,
        **describe(opt),
        "start": start,
        "final": final,
        "reduction": start - final,
        "seconds": seconds,
    }


def teacher(cfg: TeacherConfig, methods=METHODS, variants=tuple(TEACHER_VARIANTS)) -> list[dict]:
    """Every (method, variant) run; "of_fp32" = reduction ÷ the fp32 twin's reduction."""
    rows = []
    for method in methods:
        twin = None
        for variant in variants:
            dtype, mode, rounding = TEACHER_VARIANTS[variant]
            try:
                row = teacher_run(method, dtype, mode, rounding, cfg)
            except Unsupported as error:
                row = {"method": method, "dtype": dtype, "mode": mode, "unsupported": str(error)}
            row["variant"] = variant
            if variant == "fp32":
                twin = row
            if twin is not None and "reduction" in row and twin["reduction"] > 0:
                row["of_fp32"] = row["reduction"] / twin["reduction"]
            rows.append(row)
            print(_teacher_line(row), flush=True)
    return rows


def _teacher_line(r: dict) -> str:
    if "unsupported" in r:
        return f"| {r['method']} | {r['variant']} | unsupported in this build | | | | | |"
    return (
        f"| {r['method']} | {r['variant']} | {r['mode']} | {r['rounding']} | {_fmt(r['start'])} "
        f"| {_fmt(r['final'])} | {_fmt(r.get('of_fp32'), '.1%')} | {r['seconds']:.1f} |"
    )


TEACHER_HEADER = (
    "| method | variant | mode | rounding | start loss | final loss | reduction ÷ fp32's | s |\n"
    "|---|---|---|---|---|---|---|---|"
)


# drift: lr = 0.


DRIFT_MODES = {
    # name: (mode, rounding)
    "inplace": ("inplace", None),
    "inplace-nearest": ("inplace", "nearest"),
    "shadow": ("shadow", None),
    "virtual": ("virtual", None),
}


def drift_run(
    method: str,
    dtype: str,
    mode: str | None,
    rounding: str | None = None,
    *,
    size: int = 512,
    steps: int = 1000,
    eps: float = 1e-3,
    device: str = "cpu",
) -> dict:
    """A size×size Linear (no bias: every tensor of it can be virtual) stepped `steps` times at
    lr = 0 on `device`; how far the stored weights moved."""
    torch.manual_seed(0)
    model = torch.nn.Linear(size, size, bias=False).to(DTYPES[dtype]).to(device)
    x = torch.randn(64, size, generator=torch.Generator().manual_seed(1))
    x = x.to(DTYPES[dtype]).to(device)
    start = model.weight.detach().clone()
    opt = make_optimizer(method, model, 1e-3, mode=mode, rounding=rounding, eps=eps, seed=1)
    zero_lr(opt)
    for _ in range(steps):
        opt.step(lambda: model(x).float().pow(2).mean())
    finish(opt)
    w, w0 = model.weight.detach().float(), start.float()
    return {
        "method": method,
        "dtype": dtype,
        **describe(opt),
        "steps": steps,
        "relative_drift": float((w - w0).norm() / w0.norm()),
        "changed": float((w != w0).float().mean()),
        "equal": torch.equal(model.weight.detach(), start),
    }


def drift(
    dtypes, methods=METHODS, modes=tuple(DRIFT_MODES), size=512, steps=1000, device="cpu"
) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for method in methods:
            for name in modes:
                if name == "virtual" and method == "mezo":
                    continue  # full-rank noise has no virtual mode
                mode, rounding = DRIFT_MODES[name]
                try:
                    row = drift_run(
                        method, dtype, mode, rounding, size=size, steps=steps, device=device
                    )
                except Unsupported as error:
                    row = {"method": method, "dtype": dtype, "unsupported": str(error)}
                row["variant"] = name
                rows.append(row)
                print(_drift_line(row), flush=True)
    return rows


def _drift_line(r: dict) -> str:
    if "unsupported" in r:
        return f"| {r['method']} | {SHORT[r['dtype']]} | {r['variant']} | unsupported | | | |"
    return (
        f"| {r['method']} | {SHORT[r['dtype']]} | {r['variant']} | {r['mode']}, {r['rounding']} "
        f"| {r['relative_drift']:.2e} | {100 * r['changed']:.1f} % | {r['equal']} |"
    )


DRIFT_HEADER = (
    "| method | dtype | asked | resolved | relative drift | entries changed | bit-equal |\n"
    "|---|---|---|---|---|---|---|"
)


# minilm: zofast.train on SST-2 16-shot.

MINILM_VARIANTS = {
    # name: (dtype, mode, rounding); None = zofast train's default
    "fp32": ("float32", None, None),
    "bf16": ("bfloat16", None, None),
    "bf16-inplace": ("bfloat16", "inplace", None),
    "bf16-inplace-nearest": ("bfloat16", "inplace", "nearest"),
}
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "k-shot" / "SST-2" / "16-42"


def minilm_specs(args) -> list[dict]:
    """One spec (a TrainConfig dict and labels) per (method, lr, variant)."""
    from zofast.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return [
        _minilm_spec(args, fields, method, lr, variant)
        for method in args.methods
        for lr in args.lrs
        for variant in args.variants
    ]


def _minilm_spec(args, fields: set[str], method: str, lr: float, variant: str) -> dict:
    """Asks this build's TrainConfig only for fields it has; a variant that needs a missing one
    is marked unsupported."""
    dtype, mode, rounding = MINILM_VARIANTS[variant]
    name = f"{method}-lr{lr:g}-{variant}"
    config = {
        "model": args.model,
        "task": "sst-2",
        "data": str(args.data),
        "method": method,
        "lr": lr,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "log_every": args.log_every,
        "seed": args.seed,
        "dtype": dtype,
        "device": args.device,
        "output_dir": str(Path(args.out) / "runs" / name),
        "progress": False,
        "plot": False,
        "zero_shot_test": False,
        "mode": mode,
        "rounding": rounding,
    }
    if method == "lozo-m":
        config["momentum"] = args.momentum
    missing = [f"{k}={v!r}" for k, v in config.items() if v is not None and k not in fields]
    spec = {"name": name, "method": method, "lr": lr, "variant": variant}
    spec.update(threads=args.threads, tail=args.tail)
    spec["config"] = {k: v for k, v in config.items() if k in fields and v is not None}
    spec["config"]["dtype"] = dtype
    if missing:
        spec["unsupported"] = f"this build's TrainConfig has no {', '.join(missing)}"
    return spec


def _train_losses(log_path: Path) -> list[tuple[int, float]]:
    out = []
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "train":
            out.append((record["step"], record["loss"]))
    return out


def minilm_job(spec: dict) -> dict:
    """One zofast.train run (top level: multiprocessing's spawn pickles it by name)."""
    row = {k: spec[k] for k in ("name", "method", "lr", "variant")}
    row["dtype"] = spec["config"]["dtype"]
    if "unsupported" in spec:
        return {**row, "unsupported": spec["unsupported"]}
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore", message="mode='inplace' on")  # the contrast rows ask for it
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    from zofast.train import TrainConfig, train

    began = time.perf_counter()
    try:
        result = train(TrainConfig(**spec["config"]))
    except Exception as error:  # one failed run must not end the sweep: its row says why
        return {**row, "error": f"{type(error).__name__}: {error}"}
    losses = _train_losses(Path(result.files["log"]))
    steps = result.steps
    tail = [loss for step, loss in losses if step > steps - spec["tail"]] or [losses[-1][1]]
    hyper = {}
    if "trajectory" in result.files:
        hyper = json.loads(Path(result.files["trajectory"]).read_text()).get("hyperparameters", {})
    return {
        **row,
        "mode": hyper.get("mode", "inplace"),
        "rounding": hyper.get("rounding", "nearest"),
        "pipeline": hyper.get("pipeline"),
        "steps": steps,
        "first_train_loss": losses[0][1] if losses else None,
        "final_train_loss": sum(tail) / len(tail),
        "zero_shot_dev": result.zero_shot_dev,
        "final_dev": result.final_dev,
        "best_dev": result.best_dev,
        "best_step": result.best_step,
        "test_best_dev": result.test,
        "train_seconds": result.train_seconds,
        "seconds": time.perf_counter() - began,
    }


def minilm(args) -> list[dict]:
    specs = minilm_specs(args)
    jobs = max(1, min(args.jobs, len(specs)))
    rows = []
    if jobs == 1:
        results = map(minilm_job, specs)
    else:
        pool = multiprocessing.get_context("spawn").Pool(jobs)
        results = pool.imap_unordered(minilm_job, specs)
    try:
        for row in results:
            rows.append(row)
            print(_minilm_line(row), flush=True)
    finally:
        if jobs > 1:
            pool.close()
            pool.join()
    order = {spec["name"]: i for i, spec in enumerate(specs)}
    rows.sort(key=lambda r: order[r["name"]])
    twins = {(r["method"], r["lr"]): r for r in rows if r["variant"] == "fp32" and "mode" in r}
    for r in rows:
        twin = twins.get((r["method"], r["lr"]))
        if twin is not None and "final_train_loss" in r and twin["first_train_loss"] is not None:
            drop = twin["first_train_loss"] - twin["final_train_loss"]
            if drop > 0:
                own = r["first_train_loss"] - r["final_train_loss"]
                r["train_loss_drop_of_fp32"] = own / drop
    return rows


def _minilm_line(r: dict) -> str:
    head = f"| {r['method']} | {r['lr']:g} | {r['variant']} |"
    if "unsupported" in r or "error" in r:
        return f"{head} {r.get('unsupported') or r.get('error')} | | | | | |"
    return (
        f"{head} {r['mode']}, {r['rounding']} | {_fmt(r['first_train_loss'], '.4f')} → "
        f"{_fmt(r['final_train_loss'], '.4f')} | {_fmt(r.get('train_loss_drop_of_fp32'), '.0%')} "
        f"| {_fmt(r['final_dev'], '.3f')} | {_fmt(r['test_best_dev'], '.3f')} "
        f"(step {r['best_step']}) | {r['train_seconds']:.0f} |"
    )


MINILM_HEADER = (
    "| method | lr | variant | mode, rounding | train loss first → last | drop ÷ fp32's "
    "| final dev | test (best dev ckpt) | train s |\n|---|---|---|---|---|---|---|---|---|"
)


def _limited_data(src: Path, dst: Path, test_limit: int) -> Path:
    """A copy of a k-shot folder with the test split cut to its first `test_limit` examples."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if not path.is_file():
            continue
        if path.stem == "test":
            lines = path.read_text().splitlines(keepends=True)
            header = 1 if path.suffix == ".tsv" else 0
            (dst / path.name).write_text("".join(lines[: header + test_limit]))
        else:
            shutil.copy(path, dst / path.name)
    return dst


def pack_minilm(out: str, dtype: str = "float16") -> Path:
    """The embedded MiniLM's folder (config, tokenizer) with its weights cast to `dtype`."""
    from safetensors.torch import load_file, save_file

    from zofast.models import default_model_path

    src, dst = default_model_path(), Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix in (".json", ".txt") and path.name != "data_config.json":
            shutil.copy(path, dst / path.name)
    tensors = load_file(src / "model.safetensors")
    cast = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v) for k, v in tensors.items()}
    save_file(cast, dst / "model.safetensors", metadata={"format": "pt"})
    size = sum(p.stat().st_size for p in dst.iterdir())
    print(f"wrote {dst} ({size / 2**20:.1f} MiB, weights in {dtype})")
    return dst


# CLI.


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("teacher", help="teacher–student regression, fp32 vs bf16")
    defaults = TeacherConfig()
    for field in dataclasses.fields(TeacherConfig):
        p.add_argument(f"--{field.name}", type=type(getattr(defaults, field.name)))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--variants", nargs="+", choices=list(TEACHER_VARIANTS))
    p.add_argument("--out", help="JSON file to write")

    p = sub.add_parser("drift", help="lr = 0 drift per optimizer, mode and dtype")
    p.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--modes", nargs="+", choices=list(DRIFT_MODES), default=list(DRIFT_MODES))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON file to write")

    p = sub.add_parser("minilm", help="MiniLM on SST-2 16-shot: fp32 vs bf16 (GPU)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SST-2 k-shot folder")
    p.add_argument("--model", default=None, help="model folder (default: the embedded MiniLM)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 2e-6])
    p.add_argument("--variants", nargs="+", choices=list(MINILM_VARIANTS))
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--tail", type=int, default=500, help="steps averaged for the final loss")
    p.add_argument("--momentum", type=float, default=LOZO_M_MOMENTUM, help="LOZO-M's β")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (spawn)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per job (0: cores/jobs)")
    p.add_argument("--test-limit", type=int, default=0, help="use the first N test examples")
    p.add_argument("--out", default="precision-minilm", help="folder for runs/ and minilm.json")

    p = sub.add_parser("pack-minilm", help="the embedded MiniLM with fp16 weights, to carry")
    p.add_argument("out")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])

    args = parser.parse_args(argv)
    if args.cmd == "pack-minilm":
        pack_minilm(args.out, args.dtype)
        return 0
    if args.cmd == "teacher":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherConfig)}
        cfg = TeacherConfig(**{k: v for k, v in values.items() if v is not None})
        print(f"teacher: {cfg}\n\n{TEACHER_HEADER}")
        rows = teacher(cfg, args.methods, args.variants or tuple(TEACHER_VARIANTS))
        payload = {"meta": run_meta(), "config": dataclasses.asdict(cfg), "rows": rows}
    elif args.cmd == "drift":
        dtypes = args.dtypes or ["bfloat16", "float16"]
        print(
            f"drift: {args.size}×{args.size} Linear, {args.steps} steps at lr = 0 on "
            f"{args.device}\n"
        )
        print(DRIFT_HEADER)
        rows = drift(dtypes, args.methods, args.modes, args.size, args.steps, args.device)
        config = {"size": args.size, "steps": args.steps, "eps": 1e-3, "dtypes": dtypes}
        config["device"] = args.device
        payload = {"meta": run_meta(), "config": config, "rows": rows}
    else:
        args.variants = args.variants or ["fp32", "bf16", "bf16-inplace"]
        if not args.data.is_dir():
            parser.error(f"--data: no folder {args.data} (an LM-BFF SST-2 k-shot folder)")
        if args.test_limit:
            args.data = _limited_data(args.data, Path(args.out) / "data", args.test_limit)
        jobs = max(1, min(args.jobs, len(args.methods) * len(args.lrs) * len(args.variants)))
        args.threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
        print(f"minilm: SST-2 16-shot {args.data}, {args.steps} steps, {jobs} jobs\n")
        print(MINILM_HEADER)
        began = time.perf_counter()
        rows = minilm(args)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        config["seconds"] = time.perf_counter() - began
        payload = {"meta": run_meta(device), "config": config, "rows": rows}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        table = f"{MINILM_HEADER}\n" + "\n".join(_minilm_line(r) for r in rows) + "\n"
        (Path(args.out) / "minilm.md").write_text(table)
        args.out = str(Path(args.out) / "minilm.json")
        print(f"\n{table}", end="")
    _write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
