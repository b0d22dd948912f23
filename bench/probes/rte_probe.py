"""Is there a 16-shot signal for DFO-LoRA to find on RTE with MiniLM's cosine scoring?

Diagnostics (CPU, about a minute; writes ``bench/results/dfo/rte_probe.json``):

* ``zero_shot``: test accuracy of the cosine scorer as it is (what DFO-LoRA starts from);
* ``majority``: test accuracy of always answering the train split's majority class (a tie on
  the balanced 16-shot split: the first class) and of the test split's majority class;
* ``probe``: a supervised upper bound on what a readout of the frozen features can learn from
  the 32 training examples: L2-regularised logistic regression on the mean-pooled, normalised
  embeddings that the scorer compares with the label descriptions (the same features DFO-LoRA's
  loss reads); the L2 strength is chosen among ``LAMBDAS`` by dev accuracy (ties: stronger L2),
  never by test accuracy;
* ``dev_noise``: the standard error of a 32-example dev accuracy at 50 %, and the expected
  maximum of ``K`` independent such accuracies (the winner's curse of best-dev selection among
  the ``K`` snapshots a search evaluates: 67 with MiniLM, budget 8000, one dev evaluation per
  round of 120 calls), by simulation.

SST-2 and TREC are run the same way for contrast. Command::

    python bench/probes/rte_probe.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zofast.data import load_kshot
from zofast.dfo.experiments import SEEDS, TASK_FOLDERS
from zofast.models import default_model_path, load_model
from zofast.scoring import Scorer

LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
BATCH = 64


def _pooled(scorer: Scorer, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats, logits, labels = [], [], []
    for s in range(0, len(examples), BATCH):
        batch = scorer.encode(examples[s : s + BATCH])
        with torch.no_grad():
            hidden = scorer.forward_hidden(batch)
            logits.append(scorer.head_logits(hidden, batch))
        n = batch.num_examples
        mask = batch.attention_mask[:n].unsqueeze(-1).float()
        pooled = (hidden[:n].float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        feats.append(F.normalize(pooled, dim=-1))
        labels.append(batch.labels)
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def _logreg(x: torch.Tensor, y: torch.Tensor, classes: int, lam: float) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.zeros(x.shape[1] + 1, classes, dtype=torch.float64, requires_grad=True)
    xb = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + lam * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    xb = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    return (xb @ w).argmax(1)


def _acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_FOLDERS))
    default_out = Path(__file__).resolve().parents[1] / "results" / "dfo" / "rte_probe.json"
    parser.add_argument("--out", default=str(default_out))
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = load_model(default_model_path())
    out: dict = {"lambdas": list(LAMBDAS), "tasks": {}}
    for task in args.tasks:
        scorer = Scorer(loaded, task)
        rows = []
        for seed in SEEDS:
            data = load_kshot(Path(args.data) / "k-shot" / TASK_FOLDERS[task] / f"16-{seed}", task)
            (xtr, _, ytr), (xdv, ldv, ydv), (xte, lte, yte) = (
                _pooled(scorer, data[k]) for k in ("train", "dev", "test")
            )
            classes = scorer.num_labels
            best = None
            for lam in sorted(LAMBDAS, reverse=True):
                w = _logreg(xtr, ytr, classes, lam)
                dev = _acc(_predict(w, xdv), ydv)
                if best is None or dev > best[0]:
                    best = (dev, lam, _acc(_predict(w, xte), yte), _acc(_predict(w, xtr), ytr))
            counts = torch.bincount(yte, minlength=classes)
            rows.append(
                {
                    "seed": seed,
                    "zero_shot_test": _acc(lte.argmax(1), yte),
                    "zero_shot_dev": _acc(ldv.argmax(1), ydv),
                    "train_majority_test": _acc(
                        torch.full_like(yte, int(torch.bincount(ytr).argmax())), yte
                    ),
                    "test_majority": float(counts.max() / counts.sum()),
                    "probe_lambda": best[1],
                    "probe_train": best[3],
                    "probe_dev": best[0],
                    "probe_test": best[2],
                }
            )
            print(task, rows[-1], flush=True)
        mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k not in ("seed",)}
        out["tasks"][task] = {"runs": rows, "mean": mean}
    rng = np.random.default_rng(0)
    n_dev, sims = 32, 200_000
    noise = {"dev_examples": n_dev, "se_at_50": float(np.sqrt(0.25 / n_dev))}
    for k in (5, 10, 14, 20, 67):
        accs = rng.binomial(n_dev, 0.5, size=(sims, k)) / n_dev
        noise[f"expected_max_of_{k}"] = float(accs.max(1).mean())
    out["dev_noise"] = noise
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({t: v["mean"] for t, v in out["tasks"].items()}, indent=1))
    print(noise)


if __name__ == "__main__":
    main()
