"""The training loop, written once for every method, and :func:`train`, which sets it up."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from zofast.models import LoadedModel
from zofast.train.config import TrainConfig, TrainResult
from zofast.train.evaluation import evaluate, zero_shot
from zofast.train.inputs import setup
from zofast.train.methods import Method, build_method, crossed


def train(config: TrainConfig, *, loaded: LoadedModel | None = None) -> TrainResult:
    """Run one fine-tuning run (see :mod:`zofast.train` for what it does and writes).

    Args:
        config: the run configuration.
        loaded: an already loaded model to train in place (its current weights are the base);
            None loads ``config.model``. The model ends holding the best dev checkpoint.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: bad configuration or input, raised before any weight or file is written.

    Example:
        >>> result = train(TrainConfig(method="lozo", steps=300, output_dir="runs/demo"))
        >>> result.files["trajectory"]
        'runs/demo/trajectory.json'
    """
    config.validate()
    loaded, scorer, splits, _ = setup(config, loaded)
    out_dir = config.resolved_output_dir
    method = build_method(config, loaded, scorer, splits, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "log.jsonl")
    try:
        return run(config, loaded, scorer, splits, method, out_dir, log)
    finally:
        log.close()


def run(config, loaded, scorer, splits, method: Method, out_dir: Path, log: Log) -> TrainResult:
    """The loop: zero-shot, advance, log, evaluate and keep the best, then the files."""
    from zofast import plot

    total, cost = method.total, method.cost
    dev, test = splits.get("dev"), splits.get("test")
    log.write(
        "config",
        **config.to_dict(),
        resolved=method.resolved,
        model_kind=loaded.kind,
        **method.log_fields,
        splits={k: len(v) for k, v in splits.items()},
    )
    started = time.perf_counter()
    ebs = config.eval_batch_size
    zs_dev, zs_dev_loss, zs_test = zero_shot(scorer, dev, test, config, log)

    history: list[dict] = []
    best = {"key": None, "step": 0, "marker": 0, "weights": None, "dev": zs_dev}
    if dev:
        history.append({"step": 0, "dev_acc": zs_dev, "dev_loss": zs_dev_loss})
        best["key"] = (zs_dev, -zs_dev_loss)
        if method.fits():
            best["weights"] = method.snapshot()

    periods = [config.eval_every] if dev else []
    losses: list[float] = []
    window: list[float] = []
    train_seconds = 0.0
    final_dev = zs_dev
    bar = _progress(config, total)
    try:
        while method.fits():
            before = method.position
            t0 = time.perf_counter()
            records = method.advance(periods)
            train_seconds += time.perf_counter() - t0
            done = not method.fits()
            previous = before
            for i, (step, loss) in enumerate(records):
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss} at step {step}")
                losses.append(loss)
                window.append(loss)
                if crossed(previous, step, config.log_every) or (done and i == len(records) - 1):
                    log.write(
                        "train",
                        step=step,
                        loss=sum(window) / len(window),
                        forwards=step * cost,
                        steps_per_s=step / train_seconds if train_seconds > 0 else None,
                        elapsed=time.perf_counter() - started,
                    )
                    window = []
                previous = step
            step = method.position
            if dev and (crossed(before, step, config.eval_every) or done):
                method.settle()
                acc, dev_loss = evaluate(scorer, dev, ebs)
                final_dev = acc
                improved = (acc, -dev_loss) > best["key"]
                if improved:
                    best.update(key=(acc, -dev_loss), step=step, dev=acc)
                    best.update(weights=method.snapshot(), marker=method.marker())
                history.append({"step": step, "dev_acc": acc, "dev_loss": dev_loss})
                log.write("eval", step=step, dev_acc=acc, dev_loss=dev_loss, best=improved)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{losses[-1]:.4f}", dev=f"{acc:.3f}", best=f"{best['dev']:.3f}"
                    )
            elif bar is not None and step // 5 > before // 5:
                postfix = {"loss": f"{sum(losses[-20:]) / len(losses[-20:]):.4f}"}
                if best["dev"] is not None:
                    postfix["best"] = f"{best['dev']:.3f}"
                bar.set_postfix(postfix)
            if bar is not None:
                bar.update(step - before)
    finally:
        if bar is not None:
            bar.close()
        method.close()

    steps = method.position
    if not dev:
        best["step"] = steps
        best["marker"] = method.marker()
    elif best["weights"] is not None:
        method.restore(best["weights"])
        best["weights"] = None
    files = method.write_files(out_dir, best["marker"], config.save_model)
    test_acc = evaluate(scorer, test, ebs)[0] if test else None
    seconds = time.perf_counter() - started
    log.write(
        "final",
        best_step=best["step"],
        best_dev=best["dev"],
        test_acc=test_acc,
        zero_shot_dev=zs_dev,
        zero_shot_test=zs_test,
        steps=steps,
        forwards=steps * cost,
        seconds=seconds,
        train_seconds=train_seconds,
    )
    files["log"] = str(log.path)
    if config.plot:
        plot_path = out_dir / "curves.png"
        plot.plot_run(log.path, plot_path)
        files["plot"] = str(plot_path)
    result = TrainResult(
        config=config,
        zero_shot_dev=zs_dev,
        zero_shot_test=zs_test,
        best_dev=best["dev"],
        best_step=best["step"],
        test=test_acc,
        final_dev=final_dev,
        steps=steps,
        forwards=steps * cost,
        seconds=seconds,
        train_seconds=train_seconds,
        output_dir=str(out_dir),
        files=files,
        history=history,
    )
    return _saved(result)


def _saved(result: TrainResult) -> TrainResult:
    """result, written to <output_dir>/result.json (a path its own files list names)."""
    path = Path(result.output_dir) / "result.json"
    result.files["result"] = str(path)
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _progress(config: TrainConfig, steps: int):
    if not config.progress or steps == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"{config.method} {config.task}", unit="step", dynamic_ncols=True)


class Log:
    """The JSONL log: one object per line, flushed as written."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("w", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, **fields}, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
