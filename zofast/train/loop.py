"""The training loop, written once for every method, and :func:`train`, which sets it up."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zofast.models import LoadedModel
from zofast.train import checkpoint
from zofast.train.config import ConfigError, TrainConfig, TrainResult
from zofast.train.evaluation import evaluate, zero_shot
from zofast.train.inputs import setup
from zofast.train.methods import Method, build_method, crossed
from zofast.train.pause import Paused, pausable, paused
from zofast.train.ranks import Ranks, from_environment, worker_config
from zofast.train.streaming import streaming


def train(
    config: TrainConfig,
    *,
    loaded: LoadedModel | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult | Paused:
    """Run one fine-tuning run (see :mod:`zofast.train` for what it does and writes).

    Args:
        config: the run configuration.
        loaded: an already loaded model to train in place (its current weights are the base);
            None loads ``config.model``. The model ends holding the best dev checkpoint.
        stop: zeroth-order methods, one process: asked after every step (and its evaluation)
            that leaves steps to do; True pauses the run there (:mod:`zofast.train.pause`).

    Returns:
        A :class:`TrainResult` (its ``diverged`` says whether the run stopped early), or a
        :class:`~zofast.train.pause.Paused` if ``stop`` paused it (no result files then).

    Raises:
        ConfigError: bad configuration or input, raised before any weight or file is written.

    Example:
        >>> result = train(TrainConfig(method="lozo", steps=300, output_dir="runs/demo"))
        >>> result.files["trajectory"]
        'runs/demo/trajectory.json'
    """
    config.validate()
    ranks = from_environment(config)
    if stop is not None:
        pausable(config, ranks)
    if not ranks.main:
        with tempfile.TemporaryDirectory(prefix=f"zofast-rank{ranks.rank}-") as folder:
            return _train(worker_config(config, folder), loaded, ranks, stop)
    return _train(config, loaded, ranks, stop)


def _train(
    config: TrainConfig, loaded: LoadedModel | None, ranks: Ranks, stop
) -> TrainResult | Paused:
    loaded, scorer, splits, _ = setup(config, loaded)
    out_dir = config.resolved_output_dir
    with streaming(config, loaded):  # before the optimizer: it trains the host tensors
        method = build_method(config, loaded, scorer, splits, out_dir, ranks)
        out_dir.mkdir(parents=True, exist_ok=True)
        log = Log(out_dir / "log.jsonl")
        try:
            return run(config, loaded, scorer, splits, method, out_dir, log, stop=stop)
        finally:
            log.close()


def resume(
    path: str | Path, *, loaded: LoadedModel | None = None, progress: bool | None = None
) -> TrainResult:
    """Continue a stopped run from its newest checkpoint; it ends as if it had never stopped.

    The settings are the checkpoint's. The weights, optimizer state (trajectory included), data
    order, best snapshot, history and the log up to the checkpoint are restored (lines written
    after it are cut and written again), so the trajectory, the final weights, the result and
    the log (timings aside) are bit for bit those of an uninterrupted run on the same machine.
    A finished run's last checkpoint only writes its files again.

    Under torchrun every process reads the checkpoint that rank 0 wrote (the run folder must be
    visible to all of them), takes its slice of the same data order and continues the same
    trajectory; rank 0 writes the files, as in :func:`train`. With the same number of processes
    the run ends bit for bit as the uninterrupted one; with another it continues (a warning
    says so), its losses being means over other slices.

    Args:
        path: the run folder (its newest ``checkpoint-*``) or one checkpoint folder.
        loaded: the base model, freshly loaded (None loads the config's model).
        progress: show the progress bar (None: as the run did).

    Returns:
        The :class:`TrainResult`.

    Raises:
        ConfigError: no checkpoint, a damaged one, or a base model whose weights are not the
            run's; nothing is written then.

    Example:
        >>> result = resume("runs/sst2-lozo")  # after a crash, Ctrl-C or kill -9
    """
    folder = checkpoint.latest(Path(path))
    if folder is None:
        raise ConfigError(
            f"no checkpoint in {path} (a run writes checkpoint-<step>/ every checkpoint_every "
            "steps into its output folder)"
        )
    try:
        document, tensors = checkpoint.read(folder)
        values = dict(document["config"])
    except (checkpoint.CheckpointError, KeyError, TypeError) as error:
        raise ConfigError(f"cannot resume from {folder}: {error}") from None
    try:
        config = TrainConfig.from_dict(values)
    except TypeError as error:
        raise ConfigError(f"cannot resume from {folder}: {error}") from None
    out_dir = folder.parent
    if config.resolved_output_dir.resolve() != out_dir.resolve():
        config = dataclasses.replace(config, output_dir=str(out_dir))
    ranks = from_environment(config)
    if not ranks.main:  # its files go to a temporary folder, as in train()
        with tempfile.TemporaryDirectory(prefix=f"zofast-rank{ranks.rank}-") as files:
            worker = worker_config(config, files)
            return _resume(worker, folder, document, tensors, loaded, progress, ranks)
    return _resume(config, folder, document, tensors, loaded, progress, ranks)


def _resume(config, folder, document, tensors, loaded, progress, ranks: Ranks) -> TrainResult:
    """resume() from a read checkpoint; `config.output_dir` is where this process writes (the run
    folder, or a worker's temporary one)."""
    run_dir, out_dir = folder.parent, config.resolved_output_dir
    loaded, scorer, splits, _ = setup(config, loaded)
    base = _fingerprint(loaded.model)
    if document.get("base") != base:
        raise ConfigError(
            f"the model is not the one run {run_dir} started from (its base weights, shapes or "
            "dtypes differ): resume needs a fresh copy of the base model"
        )
    log_path, offset = run_dir / "log.jsonl", document.get("log_offset")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ConfigError(f"cannot resume from {folder}: bad log offset {offset!r}")
    if not log_path.is_file() or log_path.stat().st_size < offset:
        raise ConfigError(f"cannot resume from {folder}: {log_path} is missing or shorter")
    with streaming(config, loaded):  # before the optimizer, as in train()
        method = build_method(config, loaded, scorer, splits, out_dir, ranks)
        try:
            state = checkpoint.decode(document["loop"], tensors("state"))
            method_state = checkpoint.decode(document["method"], tensors("state"))
            best_weights = None
            if document.get("best") is not None:
                best_weights = checkpoint.decode(document["best"], tensors("best"))
            missing = sorted(_LOOP_KEYS - set(state))
            if missing:
                raise KeyError(f"loop state without {', '.join(missing)}")
            method.load_state_dict(method_state, folder)
        except (checkpoint.CheckpointError, KeyError, TypeError, ValueError, OSError) as error:
            raise ConfigError(f"cannot resume from {folder}: {error}") from None
        if ranks.group is not None:  # every rank has read the checkpoint before rank 0 replaces it
            import torch.distributed as dist

            dist.barrier(group=ranks.group)
        state["best_weights"] = best_weights
        state["base"] = base
        state["checkpoint"] = {"folder": folder, "best": document.get("best")}
        # rank 0 continues the run's log from the checkpoint; another rank starts its own
        log = Log(log_path, offset=offset) if ranks.main else Log(out_dir / "log.jsonl")
        try:
            return run(
                config, loaded, scorer, splits, method, out_dir, log, state=state, progress=progress
            )
        finally:
            log.close()


_LOOP_KEYS = {
    "zero_shot",
    "history",
    "best",
    "losses",
    "window",
    "train_seconds",
    "final_dev",
    "elapsed",
    "diverged",
}


def _fingerprint(model) -> list[dict]:
    """Shapes, dtypes and sampled values of every parameter: the base a run started from."""
    from zofast.trajectory import param_fingerprint

    named = list(model.named_parameters())
    n = len(named)
    return param_fingerprint([p for _, p in named], [k for k, _ in named], [0] * n, [True] * n)


def run(
    config: TrainConfig,
    loaded: LoadedModel,
    scorer,
    splits,
    method: Method,
    out_dir: Path,
    log: Log,
    *,
    state: dict | None = None,
    progress: bool | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult | Paused:
    """The loop: zero-shot, advance, log, evaluate and keep the best, checkpoint, then the
    files. ``state``: a checkpoint's loop state (:func:`resume`); ``stop``: see :func:`train`."""
    return _Run(config, loaded, scorer, splits, method, out_dir, log, state).run(progress, stop)


class _Run:
    """One run's loop and what it carries between steps (``self.st`` is what a checkpoint
    saves of it, besides the method's own state and the best snapshot)."""

    def __init__(self, config, loaded, scorer, splits, method, out_dir, log, state):
        self.config, self.loaded, self.scorer, self.method = config, loaded, scorer, method
        self.out_dir, self.log = out_dir, log
        self.dev, self.test = splits.get("dev"), splits.get("test")
        if state is None:
            self.base = _fingerprint(loaded.model) if config.checkpoint_every else None
            log.write(
                "config",
                **config.to_dict(),
                resolved=method.resolved,
                model_kind=loaded.kind,
                **method.log_fields,
                splits={k: len(v) for k, v in splits.items()},
            )
            self.started = time.perf_counter()
            zs_dev, zs_dev_loss, zs_test = zero_shot(scorer, self.dev, self.test, config, log)
            self.st = {
                "zero_shot": [zs_dev, zs_dev_loss, zs_test],
                "history": [],
                "best": {"key": None, "step": 0, "marker": 0, "dev": zs_dev, "version": 0},
                "losses": [],
                "window": [],
                "train_seconds": 0.0,
                "final_dev": zs_dev,
                "elapsed": 0.0,
                "diverged": None,
            }
            self.best_weights = None
            if self.dev:
                self.st["history"].append({"step": 0, "dev_acc": zs_dev, "dev_loss": zs_dev_loss})
                self.st["best"]["key"] = [zs_dev, -zs_dev_loss]
                if method.fits():
                    self.best_weights = method.snapshot()
            self.saved = None
        else:
            self.st = state
            self.base = state.pop("base")
            self.best_weights = state.pop("best_weights")
            self.saved = state.pop("checkpoint")  # None: resumed by replay (zofast.train.pause)
            if self.saved is not None:
                self.saved["version"] = state["best"]["version"]
            self.started = time.perf_counter() - state["elapsed"]
        self.best = self.st["best"]
        self.bar = None
        self.files: dict[str, str] = {}
        if self.saved is not None:
            self.files["checkpoint"] = str(self.saved["folder"])

    def run(self, progress: bool | None, stop) -> TrainResult | Paused:
        config, method, st = self.config, self.method, self.st
        periods = [config.eval_every] if self.dev else []
        if config.checkpoint_every:
            periods.append(config.checkpoint_every)
        show = config.progress if progress is None else progress
        self.bar = _progress(config, method.total, show, method.position)
        try:
            while method.fits() and st["diverged"] is None:
                before = method.position
                t0 = time.perf_counter()
                try:
                    records = method.advance(periods)
                except FloatingPointError as error:
                    st["diverged"] = {"step": before + 1, "reason": str(error)}
                    records = []
                st["train_seconds"] += time.perf_counter() - t0
                self._log_losses(before, records)
                step = method.position
                done = not method.fits() or st["diverged"] is not None
                due = self.dev and (crossed(before, step, config.eval_every) or done)
                if st["diverged"] is None and due:
                    self._evaluate(step)
                    done = done or st["diverged"] is not None
                elif st["diverged"] is None and self.bar is not None and step // 5 > before // 5:
                    self._postfix()
                if st["diverged"] is not None:
                    self.log.write("diverged", **st["diverged"])
                every = config.checkpoint_every
                if every and (crossed(before, step, every) or done):
                    self._checkpoint(step)
                if self.bar is not None:
                    self.bar.update(step - before)
                if stop is not None and not done and stop():
                    return paused(self)  # before close() settles the optimizer
        finally:
            if self.bar is not None:
                self.bar.close()
            method.close()
        return self._finish()

    def _log_losses(self, before: int, records: list[tuple[int, float]]) -> None:
        """The ``train`` lines: the mean loss of each ``log_every`` window, and of the last one
        (at the end of the run, or before it diverges)."""
        st = self.st
        previous = before
        for step, loss in records:
            if not math.isfinite(loss):
                st["diverged"] = {"step": step, "reason": f"training loss is {loss}"}
                break
            st["losses"].append(loss)
            del st["losses"][:-20]
            st["window"].append(loss)
            if crossed(previous, step, self.config.log_every):
                self._write_train(step)
            previous = step
        if st["window"] and (st["diverged"] is not None or not self.method.fits()):
            self._write_train(previous)

    def _write_train(self, step: int) -> None:
        window, seconds = self.st["window"], self.st["train_seconds"]
        self.log.write(
            "train",
            step=step,
            loss=sum(window) / len(window),
            forwards=step * self.method.cost,
            steps_per_s=step / seconds if seconds > 0 else None,
            elapsed=time.perf_counter() - self.started,
        )
        window.clear()

    def _evaluate(self, step: int) -> None:
        st, best = self.st, self.best
        self.method.settle()
        acc, dev_loss = evaluate(self.scorer, self.dev, self.config.eval_batch_size)
        if not math.isfinite(dev_loss):
            st["diverged"] = {"step": step, "reason": f"dev loss is {dev_loss}"}
            return
        st["final_dev"] = acc
        improved = [acc, -dev_loss] > best["key"]
        if improved:
            best.update(key=[acc, -dev_loss], step=step, dev=acc)
            best.update(marker=self.method.marker(), version=best["version"] + 1)
            self.best_weights = self.method.snapshot()
        st["history"].append({"step": step, "dev_acc": acc, "dev_loss": dev_loss})
        self.log.write("eval", step=step, dev_acc=acc, dev_loss=dev_loss, best=improved)
        if self.bar is not None:
            loss = st["losses"][-1]
            self.bar.set_postfix(loss=f"{loss:.4f}", dev=f"{acc:.3f}", best=f"{best['dev']:.3f}")

    def _postfix(self) -> None:
        losses = self.st["losses"]
        postfix = {"loss": f"{sum(losses) / len(losses):.4f}"}
        if self.best["dev"] is not None:
            postfix["best"] = f"{self.best['dev']:.3f}"
        self.bar.set_postfix(postfix)

    def _checkpoint(self, step: int) -> None:
        """Write checkpoint-<step>/ (:mod:`zofast.train.checkpoint`); an unchanged best snapshot
        is linked from the previous checkpoint."""
        self.st["elapsed"] = time.perf_counter() - self.started
        method_state, folders = self.method.state_dict()
        tensors: dict = {}
        document = {
            "config": self.config.to_dict(),
            "base": self.base,
            "log_offset": self.log.offset(),
            "loop": checkpoint.encode(self.st, tensors, "loop"),
            "method": checkpoint.encode(method_state, tensors, "method"),
            "best": None,
        }
        files: dict = {"state": tensors}
        saved, version = self.saved, self.best["version"]
        if self.best_weights is not None:
            if saved is not None and saved["version"] == version and saved["best"]:
                document["best"] = saved["best"]
                files["best"] = saved["folder"] / "best.safetensors"
            else:
                files["best"] = {}
                document["best"] = checkpoint.encode(self.best_weights, files["best"], "best")
        folder = checkpoint.write(self.out_dir, step, document, files, folders)
        self.saved = {"folder": folder, "best": document["best"], "version": version}
        self.files["checkpoint"] = str(folder)

    def _finish(self) -> TrainResult:
        """Best checkpoint back on the model, the method's files, test accuracy, final record,
        plot, result.json."""
        from zofast import plot

        config, method, st, best = self.config, self.method, self.st, self.best
        steps, cost = method.position, method.cost
        if not self.dev:
            best["step"] = steps
            best["marker"] = method.marker()
        elif self.best_weights is not None:
            method.restore(self.best_weights)
            self.best_weights = None
        files = method.write_files(self.out_dir, best["marker"], config.save_model)
        files.update(self.files)
        test = self.test
        test_acc = evaluate(self.scorer, test, config.eval_batch_size)[0] if test else None
        seconds = time.perf_counter() - self.started
        zs_dev, _, zs_test = st["zero_shot"]
        diverged = st["diverged"]
        self.log.write(
            "final",
            best_step=best["step"],
            best_dev=best["dev"],
            test_acc=test_acc,
            zero_shot_dev=zs_dev,
            zero_shot_test=zs_test,
            steps=steps,
            forwards=steps * cost,
            seconds=seconds,
            train_seconds=st["train_seconds"],
            **({"diverged": diverged} if diverged else {}),
        )
        files["log"] = str(self.log.path)
        if config.plot:
            plot_path = self.out_dir / "curves.png"
            plot.plot_run(self.log.path, plot_path)
            files["plot"] = str(plot_path)
        result = TrainResult(
            config=config,
            zero_shot_dev=zs_dev,
            zero_shot_test=zs_test,
            best_dev=best["dev"],
            best_step=best["step"],
            test=test_acc,
            final_dev=st["final_dev"],
            steps=steps,
            forwards=steps * cost,
            seconds=seconds,
            train_seconds=st["train_seconds"],
            output_dir=str(self.out_dir),
            files=files,
            history=st["history"],
            diverged=f"step {diverged['step']}: {diverged['reason']}" if diverged else None,
        )
        return _saved(result)


def _saved(result: TrainResult) -> TrainResult:
    """result, written to <output_dir>/result.json (a path its own files list names; written to
    a temporary file and renamed, so a crash never leaves half a result)."""
    path = Path(result.output_dir) / "result.json"
    result.files["result"] = str(path)
    tmp = path.with_name(".result.json.tmp")
    tmp.write_text(json.dumps(_finite(result.to_dict()), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return result


def _progress(config: TrainConfig, steps: int, show: bool, initial: int):
    if not show or steps == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=steps,
        initial=initial,
        desc=f"{config.method} {config.task}",
        unit="step",
        dynamic_ncols=True,
    )


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a non-finite float is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Log:
    """The JSONL log: one object per line, flushed as written (non-finite numbers as null).

    Args:
        path: the file.
        offset: None starts a new log; else the log of a resumed run is cut to this many bytes
            (what its checkpoint had seen) and continued.
    """

    def __init__(self, path: Path, offset: int | None = None):
        self.path = path
        if offset is None:
            self._file = path.open("w", encoding="utf-8")
        else:
            self._file = path.open("r+", encoding="utf-8")
            self._file.truncate(offset)
            self._file.seek(offset)

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps(_finite({"event": event, **fields}), allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()

    def offset(self) -> int:
        """Bytes written so far."""
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
