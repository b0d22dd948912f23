"""The search: CMA-ES and the Fireworks Algorithm alternating over layers, and its loop.

:class:`LayerSearch` holds the search state (incumbents, current loss, round and layer position,
one optimizer per layer and kind with its seed, step size and restart count, the dev history and
best snapshot) and runs it: :meth:`LayerSearch.fit` is the loop, one generation of one layer per
step (:mod:`zofast.dfo.lora` describes the alternation, hand-over, budget and selection).
:class:`~zofast.dfo.lora.DFOLoRA` is a LayerSearch that supplies the model side: ``factors``
(search vectors → low-rank factors), ``_apply_layer``/``_apply_all`` (set the hooks) and the
model, architecture and hooks themselves.

Example:
    >>> dfo = DFOLoRA(load_model(default_model_path()), popsize=10, seed=3)
    >>> dfo.fit(train, dev, budget=1000, task="sst-2", progress=False).calls
    991
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zofast.data import Example
from zofast.dfo.fireworks import Fireworks
from zofast.dfo.lora.config import OPTIMIZERS, check_int
from zofast.dfo.lora.layer import chunk_sizes
from zofast.dfo.population import PopulationEvaluator, clipped_std
from zofast.encoding import Batch
from zofast.scoring import Scorer
from zofast.tasks import Task

__all__ = ["DFOResult", "LayerSearch", "OPTIMIZER_SEED_OFFSET", "DEV_BATCH"]

OPTIMIZER_SEED_OFFSET = 8
"""First ``tensor`` index of optimizer seeds in ``RunSeeds.seed`` (chunk indices are below)."""

DEV_BATCH = 64
"""Examples per forward when measuring dev accuracy."""


@dataclass
class DFOResult:
    """What :meth:`DFOLoRA.fit` reports.

    Attributes:
        calls: forward passes over the training set used so far (whole search).
        generations: generations so far.
        rounds: completed rounds (visits of every layer).
        train_loss: current training loss of the incumbents.
        best_dev_acc: dev accuracy of the applied snapshot (``None`` without dev examples).
        best_dev_loss: its dev loss.
        best_calls: calls at which that snapshot was taken.
        elapsed: seconds of search (whole search).
        mode: the evaluator's mode (``"replay"``, ``"full"`` or ``"sequential"``).
        history: the dev evaluations, dicts with ``calls``, ``dev_acc``, ``dev_loss``, ``loss``.
    """

    calls: int
    generations: int
    rounds: int
    train_loss: float
    best_dev_acc: float | None
    best_dev_loss: float | None
    best_calls: int | None
    elapsed: float
    mode: str
    history: list[dict] = field(default_factory=list)


class LayerSearch:
    """The layer-by-layer search and its state (a base of :class:`~zofast.dfo.lora.DFOLoRA`).

    A subclass provides ``model``, ``loaded``, ``arch``, ``hooks``, ``num_layers``,
    ``layer_stds``, ``_seeds`` (the run's :class:`~zofast.rng.RunSeeds`), the options of
    :class:`~zofast.dfo.lora.config.DFOLoRAConfig` as attributes, ``factors(layer, zs)``,
    ``_apply_layer(layer, z)`` and ``_apply_all(zs)``, and calls :meth:`_init_search` once.

    Example:
        >>> class MySearch(LayerSearch): ...  # see DFOLoRA for the model side
    """

    def _init_search(self) -> None:
        """The state of a search that has not started: every incumbent at zero."""
        shape = (self.num_layers, self.intrinsic_dim)
        self._z = np.zeros(shape)
        self._applied = np.zeros(shape)
        self._best: dict[str, Any] | None = None
        self._round = 0
        self._layer_pos = 0
        self._generation = 0
        self._calls = 0
        self._f_cur: float | None = None
        self._elapsed = 0.0
        n_opt = len(OPTIMIZERS)
        self._restarts = np.zeros((self.num_layers, n_opt), dtype=np.int64)
        self._sigmas = np.full((self.num_layers, n_opt), np.nan)
        self._synced = np.zeros((self.num_layers, n_opt), dtype=bool)
        self._es: dict[tuple[int, int], Any] = {}
        self._created: dict[tuple[int, int], tuple[int, float, np.ndarray]] = {}
        self._rngs: dict[tuple[int, int], np.random.Generator] = {}
        self.history: list[dict] = []
        self.evaluator: PopulationEvaluator | None = None

    @property
    def z(self) -> np.ndarray:
        """The search vectors applied to the model now, ``(num_layers, intrinsic_dim)``."""
        return self._applied.copy()

    @property
    def incumbents(self) -> np.ndarray:
        """The search state: each layer's best vector so far, ``(num_layers, intrinsic_dim)``."""
        return self._z.copy()

    @property
    def calls(self) -> int:
        """Forward passes over the training set used so far."""
        return self._calls

    @property
    def train_loss(self) -> float | None:
        """Training loss of the incumbents (``None`` before the first fit)."""
        return self._f_cur

    def _optimizer_seed(self, layer: int, o: int) -> int:
        k = int(self._restarts[layer, o])
        s = self._seeds.seed(layer, OPTIMIZER_SEED_OFFSET + o + len(OPTIMIZERS) * k, "search")
        return s or 1

    def _optimizer(self, layer: int, o: int, created: tuple | None = None):
        key = (layer, o)
        es = self._es.get(key)
        if es is not None:
            return es
        if created is None:
            seed = self._optimizer_seed(layer, o)
            sigma0 = float(self._sigmas[layer, o])
            if not (math.isfinite(sigma0) and sigma0 > 0):
                sigma0 = self.sigma
            x0 = self._z[layer].copy()
        else:
            seed, sigma0, x0 = created
        self._created[key] = (seed, sigma0, x0.copy())
        if OPTIMIZERS[o] == "cma":
            import cma

            rng = np.random.Generator(np.random.PCG64(seed))
            opts = {
                "popsize": self.popsize,
                "seed": np.nan,
                "randn": lambda *shape: rng.standard_normal(shape),
                "CMA_diagonal": self.cma_diagonal,
                "verbose": -9,
                "verb_disp": 0,
                "verb_log": 0,
            }
            opts.update(self.cma_options)
            es = cma.CMAEvolutionStrategy(x0, sigma0, opts)
            self._rngs[key] = rng
        else:
            es = Fireworks(x0, sigma0, {**self.fwa_options, "seed": seed, "popsize": self.popsize})
        self._es[key] = es
        self._synced[layer, o] = True
        return es

    def _scorer(self, task: Task | str | None, scorer: Scorer | None) -> Scorer:
        if scorer is not None:
            if getattr(scorer, "model", None) is not self.model:
                raise ValueError("scorer must wrap the model DFOLoRA was built on")
            return scorer
        if task is None:
            raise ValueError("fit needs task= (a Task or a built-in task name) or scorer=")
        if self.loaded is None:
            raise ValueError(
                "DFOLoRA was built on a bare model: pass scorer=Scorer(LoadedModel(...), task)"
            )
        return Scorer(self.loaded, task)

    def _encode(self, scorer: Scorer, examples: list[Example], parts: int) -> list[Batch]:
        parts = max(1, min(parts, len(examples)))
        if parts == 1:
            return [scorer.encode(examples)]
        full = scorer.encode(examples)
        lengths = full.attention_mask[: full.num_examples].sum(dim=1).tolist()
        order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
        sizes = chunk_sizes(len(examples), parts)
        out, start = [], 0
        for size in sizes:
            out.append(scorer.encode([examples[i] for i in order[start : start + size]]))
            start += size
        return out

    def _evaluate(self, layer: int, zs: np.ndarray) -> np.ndarray:
        step = self.max_candidates or len(zs)
        out = []
        for s in range(0, len(zs), step):
            out.append(self.evaluator.losses(layer, self.factors(layer, zs[s : s + step])))
        losses = torch.cat(out).double().cpu().numpy()
        return np.where(np.isfinite(losses), losses, np.inf)

    def _dev_eval(self, scorer: Scorer, dev_batches: list[Batch]) -> tuple[float, float]:
        correct, total, loss_sum = 0, 0, 0.0
        for batch in dev_batches:
            logits = scorer.logits(batch)
            correct += int((logits.argmax(dim=1) == batch.labels).sum())
            loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            total += batch.num_examples
        return correct / total, loss_sum / total

    def _record_dev(self, acc: float, loss: float) -> None:
        entry = {
            "calls": self._calls,
            "round": self._round,
            "dev_acc": acc,
            "dev_loss": loss,
            "loss": self._f_cur,
        }
        self.history.append(entry)
        best = self._best
        if best is None or (acc, -loss) > (best["dev_acc"], -best["dev_loss"]):
            self._best = {
                "z": self._z.copy(),
                "dev_acc": acc,
                "dev_loss": loss,
                "calls": self._calls,
                "round": self._round,
            }

    def _generation_step(self) -> dict[str, Any]:
        layer = self._layer_pos
        o_name = self.optimizers[self._round % len(self.optimizers)]
        o = OPTIMIZERS.index(o_name)
        es = self._optimizer(layer, o)
        if not self._synced[layer, o]:
            es.inject([self._z[layer].copy()], force=True)
            self._synced[layer, o] = True
        xs = es.ask()
        zs = np.asarray(xs, dtype=np.float64)
        losses = self._evaluate(layer, zs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="elements of z2", category=UserWarning)
            es.tell(xs, losses.tolist())
        self._calls += len(xs)
        self._generation += 1
        i = int(np.argmin(losses))
        if losses[i] < self._f_cur:
            self._z[layer] = zs[i]
            self._f_cur = float(losses[i])
            self._apply_layer(layer, zs[i])
            self._synced[layer, :] = False
            self._synced[layer, o] = True
        self._sigmas[layer, o] = float(es.sigma)
        if es.stop():
            del self._es[(layer, o)]
            self._created.pop((layer, o), None)
            self._rngs.pop((layer, o), None)
            self._restarts[layer, o] += 1
            self._sigmas[layer, o] = np.nan
        finite = losses[np.isfinite(losses)]
        info = {
            "round": self._round,
            "layer": layer,
            "optimizer": o_name,
            "gen_best": float(finite.min()) if finite.size else None,
            "gen_mean": float(finite.mean()) if finite.size else None,
            "sigma": float(es.sigma),
        }
        self._layer_pos += 1
        if self._layer_pos == self.num_layers:
            self._layer_pos = 0
            self._round += 1
        return info

    def fit(
        self,
        train_examples: Sequence[Example],
        dev_examples: Sequence[Example] | None = None,
        budget: int = 8000,
        eval_every: int | None = None,
        log: str | Path | None = None,
        *,
        task: Task | str | None = None,
        scorer: Scorer | None = None,
        progress: bool = True,
    ) -> DFOResult:
        """Search (or continue searching) until ``budget`` calls are used.

        Args:
            train_examples: the training set (all of it is one call per candidate).
            dev_examples: examples that pick the snapshot applied at the end (optional).
            budget: total calls of the whole search (a resumed search counts earlier calls).
            eval_every: calls between dev evaluations (default: one round, ``popsize·L``).
            log: JSONL file: one object per generation with ``step`` (generation), ``calls``,
                ``round``, ``layer``, ``optimizer``, ``loss`` (current training loss),
                ``gen_best``, ``gen_mean``, ``sigma``, ``dev_acc`` and ``dev_loss`` (null when
                not measured after that generation) and ``elapsed`` (seconds); a first line with
                ``step`` 0 has the starting point. Appended to when the search is resumed.
            task: a :class:`~zofast.tasks.Task` or built-in name (with a LoadedModel).
            scorer: a :class:`~zofast.scoring.Scorer` of this model instead of ``task``.
            progress: show a tqdm progress bar (in calls).

        Returns:
            A :class:`DFOResult`.

        Raises:
            ValueError: if ``budget`` is smaller than one generation (``popsize``), on empty
                training examples, a bad ``eval_every``, or no task/scorer.

        Example:
            >>> res = dfo.fit(train, dev, budget=8000, task="sst-2", log="runs/dfo.jsonl")
            >>> res.best_dev_acc
            0.8125
        """
        from tqdm.auto import tqdm

        budget = check_int(budget, "budget", 1)
        if budget < self.popsize:
            raise ValueError(
                f"budget ({budget}) is smaller than one generation (popsize {self.popsize})"
            )
        if eval_every is None:
            eval_every = self.popsize * self.num_layers
        eval_every = check_int(eval_every, "eval_every", 1)
        train = list(train_examples)
        if not train:
            raise ValueError("fit needs at least one training example")
        dev = list(dev_examples) if dev_examples is not None else []
        scorer = self._scorer(task, scorer)
        self.model.eval()
        start = time.perf_counter()
        elapsed0 = self._elapsed

        def elapsed() -> float:
            return elapsed0 + time.perf_counter() - start

        fresh = self._generation == 0 and self._f_cur is None
        log_file = None
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log, "w" if fresh else "a", encoding="utf-8")  # noqa: SIM115
        bar = tqdm(
            total=budget,
            initial=min(self._calls, budget),
            disable=not progress,
            desc="DFO-LoRA",
            unit="call",
        )
        try:
            with torch.no_grad():
                batches = self._encode(scorer, train, self.length_buckets)
                dev_batches = [
                    scorer.encode(dev[i : i + DEV_BATCH]) for i in range(0, len(dev), DEV_BATCH)
                ]
                if self.layer_stds is not None:
                    self._apply_all(self._z)
                self.evaluator = PopulationEvaluator(
                    scorer,
                    self.arch,
                    self.hooks,
                    batches,
                    mode=self.mode,
                    record_inputs=self.layer_stds is None,
                )
                if self.layer_stds is None:
                    self._init_layer_stds(self.evaluator)
                    self._apply_all(self._z)
                if self._f_cur is None:
                    self._f_cur = self.evaluator.current_loss()
                    self._calls += 1
                    bar.update(1)

                def write(record: dict) -> None:
                    if log_file is not None:
                        log_file.write(json.dumps(record, allow_nan=False) + "\n")
                        log_file.flush()

                last_eval = self.history[-1]["calls"] if self.history else None
                dev_acc = dev_loss = None
                if dev and last_eval != self._calls:
                    dev_acc, dev_loss = self._dev_eval(scorer, dev_batches)
                    self._record_dev(dev_acc, dev_loss)
                if fresh:
                    write(
                        {
                            "step": 0,
                            "calls": self._calls,
                            "round": 0,
                            "layer": None,
                            "optimizer": None,
                            "loss": self._f_cur,
                            "gen_best": None,
                            "gen_mean": None,
                            "sigma": None,
                            "dev_acc": dev_acc,
                            "dev_loss": dev_loss,
                            "elapsed": elapsed(),
                        }
                    )
                while self._calls + self.popsize <= budget:
                    before = self._calls
                    info = self._generation_step()
                    bar.update(self._calls - before)
                    dev_acc = dev_loss = None
                    due = self._calls // eval_every > before // eval_every
                    last = self._calls + self.popsize > budget
                    if dev and (due or last):
                        dev_acc, dev_loss = self._dev_eval(scorer, dev_batches)
                        self._record_dev(dev_acc, dev_loss)
                    write(
                        {
                            "step": self._generation,
                            "calls": self._calls,
                            **{k: info[k] for k in ("round", "layer", "optimizer")},
                            "loss": self._f_cur,
                            **{k: info[k] for k in ("gen_best", "gen_mean", "sigma")},
                            "dev_acc": dev_acc,
                            "dev_loss": dev_loss,
                            "elapsed": elapsed(),
                        }
                    )
                    postfix = {"loss": f"{self._f_cur:.4f}"}
                    if self._best is not None:
                        postfix["dev"] = f"{self._best['dev_acc']:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                self._elapsed = elapsed()
                chosen = self._best["z"] if self._best is not None else self._z
                self._apply_all(chosen)
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        return self.result()

    def _init_layer_stds(self, evaluator: PopulationEvaluator) -> None:
        stds = evaluator.input_stds()
        emb = self.model.get_input_embeddings()
        if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor):
            raise ValueError("init='hidden' needs the model's input word embeddings")
        stds[0] = clipped_std(emb.weight)
        out = np.array(stds, dtype=np.float64)
        if not (np.isfinite(out).all() and (out > 0).all()):
            raise ValueError(f"init='hidden': degenerate hidden-state stds {out.tolist()}")
        self.layer_stds = out

    def result(self) -> DFOResult:
        """The current :class:`DFOResult` (what the last :meth:`fit` returned, or a loaded one).

        Returns:
            A :class:`DFOResult`.

        Example:
            >>> dfo.result().calls
            7981
        """
        best = self._best
        return DFOResult(
            calls=self._calls,
            generations=self._generation,
            rounds=self._round,
            train_loss=self._f_cur if self._f_cur is not None else math.nan,
            best_dev_acc=None if best is None else best["dev_acc"],
            best_dev_loss=None if best is None else best["dev_loss"],
            best_calls=None if best is None else best["calls"],
            elapsed=self._elapsed,
            mode=self.evaluator.mode if self.evaluator is not None else self.mode,
            history=[dict(h) for h in self.history],
        )
