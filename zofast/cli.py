"""The ``zofast`` command: train, replay, eval, demo, bench.

Usage::

    zofast train --task sst-2 --data ../shared/data/k-shot/SST-2/16-42 --method lozo --steps 2000
    zofast replay --trajectory runs/sst-2-lozo-s42/trajectory-best.json --out tuned/
    zofast eval --model tuned/ --task sst-2 --data ../shared/data/k-shot/SST-2/16-42
    zofast eval --trajectory runs/sst-2-lozo-s42/trajectory-best.json --task sst-2 --data ...
    zofast demo
    zofast bench

``--model`` defaults to the embedded all-MiniLM-L6-v2 everywhere. Bad input (unknown task or
method, missing data folder, lr <= 0, rank < 1, nu < 1, an unknown or absent ``--device``, a flag
the method does not use, a model with nothing to train, a malformed data or trajectory file, a
trajectory that does not fit the model, ...; docs/errors.md lists them) prints one line
``zofast <command>: error: ...`` and exits with code 2 before any weight or file is written. Any
other failure prints one line too and exits with code 1; ``--debug`` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

__all__ = ["main", "build_parser", "DEMO"]

#: Settings of ``zofast demo`` (chosen on 2 CPU cores; see docs/demo.md for the seeds tried).
DEMO = {
    "task": "demo",
    "data": "demo",
    "method": "lozo",
    "lr": 3e-5,
    "steps": 800,
    "eval_every": 50,
    "batch_size": 16,
    "freeze": "word_embeddings",
    "seed": 42,
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``zofast <cmd>: error: ...``) and exit code 2.

    Values like ``-1e-4`` are read as negative numbers (argparse alone takes them for options), so
    ``--lr -1e-4`` reaches the lr check and its message.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _UsageError(Exception):
    """Bad input found by the CLI itself (exit code 2)."""


class _Given:
    """Mixin of the train flags' actions: records each flag given on the command line in
    ``namespace.given`` (defaults are not recorded), so flags a method ignores can be refused."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


class _GivenStore(_Given, argparse._StoreAction):
    pass


class _GivenBool(_Given, argparse.BooleanOptionalAction):
    pass


# TrainConfig fields each method does not use: giving one on the command line is an error, not a
# silent no-op. (momentum > 0 outside lozo-m, pipeline outside mode inplace: TrainConfig.validate.)
_ZO_ONLY = ("eps", "mode", "rounding", "pipeline", "directions", "split")
_UNUSED_BY = {
    "lozo": ("popsize", "intrinsic_dim"),
    "lozo-m": ("popsize", "intrinsic_dim"),
    "mezo": ("rank", "nu", "popsize", "intrinsic_dim", "paired"),
    "adam": (*_ZO_ONLY, "rank", "nu", "popsize", "intrinsic_dim", "paired"),
    "lora": (*_ZO_ONLY, "nu", "popsize", "intrinsic_dim", "paired", "freeze"),
    "dfo-lora": (
        *_ZO_ONLY,
        "lr",
        "nu",
        "momentum",
        "weight_decay",
        "freeze",
        "log_every",
        "paired",
    ),
}


def _check_flags_used(method: str, dtype: str, given: set[str]) -> None:
    """Refuse flags `method` ignores, --steps beside --forward-budget (which overrides it) and
    --rounding for float32 weights (which are never rounded)."""
    unused = [name for name in _UNUSED_BY.get(method, ()) if name in given]
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        raise _UsageError(f"method {method} does not use {flags}; leave it out")
    if {"steps", "forward_budget"} <= given:
        raise _UsageError("--forward-budget sets the number of steps: give it or --steps, not both")
    if "rounding" in given and dtype == "float32":
        raise _UsageError("--rounding applies to bfloat16 / float16: float32 is not rounded")


def _check_device(name: str) -> str:
    """The device a --device value names ("auto" resolved), or a _UsageError saying why not."""
    from zofast.models import resolve_device

    try:
        return str(resolve_device(name))
    except ValueError as error:
        raise _UsageError(f"--device: {error}") from None


def _config_help() -> dict[str, str]:
    """Help text of each TrainConfig field, taken from its docstring's Args section."""
    from zofast.train import TrainConfig

    doc = TrainConfig.__doc__ or ""
    helps: dict[str, str] = {}
    current = None
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        if stripped.endswith(":") and " " not in stripped:
            break
        match = re.match(r"^ {8}(\w+): (.*)$", line)
        if match:
            current = match.group(1)
            helps[current] = match.group(2)
        elif current and stripped:
            helps[current] += " " + stripped
    plain = {}
    for key, text in helps.items():
        text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
        plain[key] = text.replace("%", "%%")
    return plain


def _add_config_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    from zofast.train import TrainConfig

    helps = _config_help()
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        default = f.default
        help_text = helps.get(f.name, "")
        metavar = f.metadata.get("metavar")
        if kind in ("bool", "bool | None"):
            parser.add_argument(flag, action=_GivenBool, default=default, help=help_text)
            continue
        options = {"action": _GivenStore, "default": default, "help": help_text}
        if kind.startswith("tuple"):
            parser.add_argument(flag, nargs="+", metavar=metavar or "WORD", **options)
        elif kind.startswith("int"):
            parser.add_argument(flag, type=int, **options)
        elif kind.startswith("float"):
            parser.add_argument(flag, type=float, **options)
        else:
            parser.add_argument(flag, type=str, metavar=metavar, **options)


def _config_from_args(args: argparse.Namespace):
    from zofast.train import TrainConfig

    return TrainConfig(
        **_tuples({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    )


def _tuples(values: dict) -> dict:
    """argparse's lists as the tuples TrainConfig holds."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


_DEBUG_HELP = "on an error, show the traceback instead of one line"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``zofast`` command (all subcommands).

    Returns:
        An ``argparse.ArgumentParser``.

    Example:
        >>> args = build_parser().parse_args(["train", "--method", "mezo", "--lr", "1e-5"])
        >>> args.method, args.lr
        ('mezo', 1e-05)
    """
    from zofast.train import COLUMN_FIELDS

    parser = _Parser(
        prog="zofast",
        description="Zeroth-order (LOZO, LOZO-M, MeZO) and derivative-free fine-tuning.",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="fine-tune a model on a task (all TrainConfig fields)")
    _add_config_flags(p)
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue a stopped run from the newest checkpoint in DIR (its output folder), with "
        "the run's own settings; it ends as the uninterrupted run would have",
    )

    p = sub.add_parser("replay", help="rebuild fine-tuned weights from a trajectory")
    p.add_argument("--model", default=None, help="base model (default: embedded MiniLM)")
    p.add_argument("--trajectory", required=True, help="trajectory JSON from zofast train")
    p.add_argument("--out", required=True, help="folder to write the rebuilt model to")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")

    p = sub.add_parser("eval", help="accuracy of a model (or base + trajectory) on a task")
    p.add_argument("--model", default=None, help="model name or folder (default: embedded MiniLM)")
    p.add_argument("--trajectory", default=None, help="apply this trajectory to --model first")
    p.add_argument("--task", required=True, help="built-in task name (docs/tasks.md) or a name")
    p.add_argument("--data", required=True, help="'demo' or a data folder")
    p.add_argument("--template", default=None, help="custom task template")
    p.add_argument("--label-words", nargs="+", default=None, metavar="WORD")
    _add_config_flags(p, only=COLUMN_FIELDS)
    p.add_argument("--split", nargs="+", default=None, help="splits (default: dev and test)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument(
        "--dtype", default=None, help="float32 (default), bfloat16, float16; with --trajectory: its"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")

    p = sub.add_parser("demo", help="LOZO on the bundled demo set with the embedded MiniLM")
    p.add_argument("--output-dir", default="zofast-demo", help="where log, plot, trajectory go")
    p.add_argument("--steps", type=int, default=DEMO["steps"])
    p.add_argument("--seed", type=int, default=DEMO["seed"])
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    p = sub.add_parser("bench", help="run the GPU benchmarks (pytest bench --benchmark-only)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments")
    for command in sub.choices.values():
        if command.prog.split()[-1] != "bench":  # bench passes its arguments on to pytest
            # SUPPRESS: a subcommand's default would overwrite `zofast --debug <command>`'s flag.
            command.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
            )
    return parser


def _load_trajectory(path: str):
    from zofast.trajectory import Trajectory

    if not Path(path).is_file():
        raise _UsageError(f"trajectory file not found: {path}")
    try:
        return Trajectory.load(path)
    except (ValueError, OSError) as error:
        raise _UsageError(f"cannot read trajectory {path}: {error}") from None


def _trajectory_dtype(trajectory) -> str:
    entries = trajectory.params or []
    dtypes = {e["dtype"] for e in entries if e.get("trained")}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def _load_with_trajectory(
    model: str | None, trajectory_path: str, device: str, dtype: str | None = None
):
    """Load the base model and replay a trajectory onto it (any mismatch is a _UsageError)."""
    from zofast.models import load_model
    from zofast.replay import replay

    trajectory = _load_trajectory(trajectory_path)
    if dtype is not None and dtype != _trajectory_dtype(trajectory):
        raise _UsageError(
            f"--dtype {dtype}: the trajectory was recorded in {_trajectory_dtype(trajectory)}, "
            "and replays only in it; leave --dtype out"
        )
    try:
        loaded = load_model(model, dtype=_trajectory_dtype(trajectory), device=device)
    except (OSError, ValueError, ImportError) as error:
        raise _UsageError(f"cannot load model {model or '(default)'}: {error}") from None
    try:
        replay(loaded.model, trajectory)
    except (ValueError, TypeError) as error:
        raise _UsageError(f"trajectory does not fit the model: {error}") from None
    return loaded


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _cmd_train(args) -> int:
    from zofast.train import TrainConfig, resume, train

    if args.resume is not None:
        given = [
            "--" + f.name.replace("_", "-")
            for f in dataclasses.fields(TrainConfig)
            if f.name != "progress" and getattr(args, f.name) != f.default
        ]
        if given:
            raise _UsageError(
                f"--resume continues the run with the settings it started with; drop "
                f"{', '.join(given)}"
            )
        run_dir = Path(args.resume)
        start = partial(resume, args.resume, progress=args.progress)
    else:
        _check_flags_used(args.method, args.dtype, getattr(args, "given", set()))
        if args.device_map is None:  # (with a device map, --device stays "auto": refused else)
            args.device = _check_device(args.device)
        config = _config_from_args(args)
        run_dir = config.resolved_output_dir
        start = partial(train, config)
    try:
        result = start()
    except KeyboardInterrupt:
        from zofast.train.checkpoint import latest

        found = latest(run_dir) if run_dir.is_dir() else None
        hint = f"; zofast train --resume {run_dir} continues from {found.name}" if found else ""
        print(f"zofast train: interrupted{hint}", file=sys.stderr)
        return 130
    if result.diverged is not None:
        print(
            f"zofast train: diverged at {result.diverged}; stopped and kept the trajectory and "
            f"the best checkpoint (step {result.best_step}) in {result.output_dir}",
            file=sys.stderr,
        )
        return 1
    _print_result(result)
    return 0


def _pct(value: float | None) -> str:
    return "  n/a" if value is None else f"{100 * value:5.1f} %"


def _print_result(result) -> None:
    cfg = result.config
    print(f"method {cfg.method}, task {cfg.task}, {result.steps} steps, {result.seconds:.0f} s")
    print(f"zero-shot: dev {_pct(result.zero_shot_dev)}   test {_pct(result.zero_shot_test)}")
    print(
        f"tuned:     dev {_pct(result.best_dev)}   test {_pct(result.test)}   "
        f"(best dev at step {result.best_step})"
    )
    for name, path in result.files.items():
        print(f"{name + ':':17s}{path}")


def _cmd_replay(args) -> int:
    from zofast.models import default_model_path

    out = Path(args.out)
    base = Path(args.model) if args.model is not None else default_model_path()
    if base.exists() and _same_path(out, base):
        raise _UsageError(f"--out {out} is the base model folder; choose another folder")
    if out.exists() and not out.is_dir():
        raise _UsageError(f"--out {out} exists and is not a folder")
    device = _check_device(args.device)
    loaded = _load_with_trajectory(args.model, args.trajectory, device)
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    print(f"rebuilt weights written to {out} (safetensors)")
    return 0


def _cmd_eval(args) -> int:
    from zofast.models import load_model
    from zofast.scoring import Scorer
    from zofast.train import (
        COLUMN_FIELDS,
        ConfigError,
        TrainConfig,
        evaluate,
        load_splits,
        resolve_task,
    )

    device = _check_device(args.device)
    dtype = args.dtype or "float32"
    config = TrainConfig(
        model=args.model,
        task=args.task,
        data=args.data,
        template=args.template,
        label_words=None if args.label_words is None else tuple(args.label_words),
        eval_batch_size=args.batch_size,
        max_length=args.max_length,
        dtype=dtype,
        device=device,
        **_tuples({k: getattr(args, k) for k in COLUMN_FIELDS}),
    ).validate()
    task = resolve_task(config)
    splits = load_splits(config.data, task, **config.columns)
    wanted = args.split or [s for s in ("dev", "test") if s in splits]
    missing = [s for s in wanted if s not in splits]
    if missing:
        raise _UsageError(f"split(s) {missing} not in {args.data} (has {sorted(splits)})")
    if args.trajectory is not None:
        loaded = _load_with_trajectory(args.model, args.trajectory, device, args.dtype)
    else:
        try:
            loaded = load_model(args.model, dtype=dtype, device=device)
        except (OSError, ValueError, ImportError) as error:
            raise _UsageError(f"cannot load model {args.model or '(default)'}: {error}") from None
    try:
        scorer = Scorer(loaded, task, max_length=config.max_length)
    except (ValueError, NotImplementedError) as error:
        raise ConfigError(f"model and task do not fit together: {error}") from None
    results = {}
    for split in wanted:
        acc, loss = evaluate(scorer, splits[split], args.batch_size)
        results[split] = {"accuracy": acc, "loss": loss, "examples": len(splits[split])}
    if args.json:
        print(json.dumps(results))
    else:
        for split, r in results.items():
            print(
                f"{split}: accuracy {100 * r['accuracy']:.1f} % ({r['examples']} examples), "
                f"loss {r['loss']:.4f}"
            )
    return 0


def _cmd_demo(args) -> int:
    import torch

    from zofast.train import TrainConfig, train

    if args.steps < 1:
        raise _UsageError(f"--steps must be >= 1, got {args.steps}")
    config = TrainConfig(
        **{**DEMO, "steps": args.steps, "seed": args.seed},
        output_dir=args.output_dir,
        progress=args.progress,
    )
    print(
        "zofast demo: LOZO fine-tuning of the embedded all-MiniLM-L6-v2 on zofast's bundled "
        f"sentiment set ({config.steps} steps, batch {config.batch_size}, lr {config.lr:g}, "
        f"{torch.get_num_threads()} CPU threads)",
        flush=True,
    )
    started = time.perf_counter()
    result = train(config)
    elapsed = time.perf_counter() - started
    out = Path(result.output_dir)
    print(f"zero-shot test accuracy: {_pct(result.zero_shot_test)}")
    print(
        f"tuned     test accuracy: {_pct(result.test)}   (best dev checkpoint: step "
        f"{result.best_step}; {elapsed:.0f} s in all)"
    )
    print(f"log:        {out / 'log.jsonl'}")
    print(f"plot:       {out / 'curves.png'}")
    print(f"trajectory: {out / 'trajectory-best.json'} (whole run: {out / 'trajectory.json'})")
    print(
        f"rebuild the tuned weights: zofast replay --trajectory {out / 'trajectory-best.json'} "
        f"--out {out / 'model'}"
    )
    return 0


def _bench_root() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "bench").is_dir() and (root / "pyproject.toml").is_file():
            return root
    return None


def _cmd_bench(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "zofast bench: no CUDA GPU is visible to torch "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); the "
            "benchmarks in bench/ time the GPU kernels and need one. Nothing was run.",
            file=sys.stderr,
        )
        return 1
    root = _bench_root()
    if root is None:
        raise _UsageError("bench/ not found: run zofast bench from the zofast source tree")
    extra = [a for a in args.pytest_args if a != "--"]
    command = [sys.executable, "-P", "-m", "pytest", "bench", "--benchmark-only", *extra]
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command, cwd=root, env=dict(os.environ))


_COMMANDS = {
    "train": _cmd_train,
    "replay": _cmd_replay,
    "eval": _cmd_eval,
    "demo": _cmd_demo,
    "bench": _cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    """Run the ``zofast`` command line.

    Args:
        argv: arguments without the program name; None = ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 2 on bad input (one-line message on stderr, nothing written),
        1 when a run diverges (one-line message; its files are kept), on any other failure (one
        line; ``--debug`` raises it with its traceback) and when ``zofast bench`` finds no GPU,
        130 on Ctrl-C.

    Example:
        >>> main(["train", "--steps", "2", "--eval-every", "2", "--no-progress", "--no-plot",
        ...       "--output-dir", "runs/x"])  # doctest: +ELLIPSIS
        method lozo, task demo, 2 steps, ...
        0
        >>> main(["train", "--device", "gpu"])  # stderr: zofast train: error: --device: unknown ...
        2
    """
    from zofast.models import quiet_transformers
    from zofast.train import ConfigError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _cmd_bench(args)
        with quiet_transformers(log=False, progress_bars=True):
            return _COMMANDS[args.command](args)
    except (ConfigError, _UsageError) as error:
        if args.debug:
            raise
        print(f"zofast {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zofast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(
            f"zofast {args.command}: failed: {type(error).__name__}: {_one_line(error)} "
            "(--debug shows the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
