"""Where a population-batched DFO-LoRA generation spends its GPU time (torch.profiler).

Same models, batch and search vectors as ``bench/suites/test_dfo_population.py`` (RoBERTa-large and
GPT-2-large shapes, random bf16 weights, 32 × 64 tokens, popsize 20, every layer with an
incumbent). For each shape: one generation at layer 0 (the whole stack runs on the 20 copies)
with the evaluator's defaults and with ``trim=False, fuse_activations=False, merge=False``;
prints the kernels that take the most GPU time, and the share of matrix products. Writes
``profile_<shape>.txt`` into the folder given as the first argument (default: the current one).
Needs a CUDA GPU.

    python bench/probes/profile_population.py $OUT   # results: bench/results/dfo/profile_*.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "suites"))
sys.path.insert(0, str(ROOT / "tests"))

from helpers_models import make_tokenizer  # noqa: E402
from test_dfo_population import (  # noqa: E402
    DTYPE,
    POPSIZE,
    Z_CANDIDATE,
    Z_INCUMBENT,
    _batch,
    _config,
)

from zofast.dfo.lora import DFOLoRA  # noqa: E402
from zofast.dfo.population import PopulationEvaluator  # noqa: E402
from zofast.models import LoadedModel  # noqa: E402
from zofast.scoring import Scorer  # noqa: E402

GEMM_MARKERS = ("gemm", "sm90", "cutlass", "nvjet", "matmul", "xmma")


def _profile(evaluator: PopulationEvaluator, dfo: DFOLoRA, zs: np.ndarray) -> tuple[str, float]:
    mats = dfo.factors(0, zs)
    with torch.no_grad():
        evaluator.losses(0, mats)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            evaluator.losses(0, mats)
            torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events if e.device_time_total > 0)
    gemm = sum(
        e.device_time_total
        for e in events
        if any(m in e.key.lower() for m in GEMM_MARKERS) and e.device_time_total > 0
    )
    table = events.table(sort_by="device_time_total", row_limit=18, max_name_column_width=70)
    head = f"GPU time {total / 1e3:.2f} ms, matrix products {100 * gemm / max(total, 1):.0f} %\n"
    return head + table, total / 1e3


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for shape in ("roberta-large", "gpt2-large"):
        config, cls, kind, style = _config(shape)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = cls(config).eval().to(DTYPE)
        tokenizer = make_tokenizer(style)
        loaded = LoadedModel(model=model, tokenizer=tokenizer, kind=kind, name=shape)
        scorer = Scorer(loaded, "sst-2")
        batch = _batch(scorer, kind, tokenizer, torch.Generator().manual_seed(0))
        dfo = DFOLoRA(loaded, rank=4, intrinsic_dim=500, popsize=POPSIZE, seed=1, init="random")
        rng = np.random.default_rng(0)
        dfo.set_z(Z_INCUMBENT * rng.standard_normal((dfo.num_layers, dfo.intrinsic_dim)))
        zs = Z_CANDIDATE * rng.standard_normal((POPSIZE, dfo.intrinsic_dim))
        text = []
        for name, kw in (
            ("defaults", {}),
            ("plain", {"trim": False, "fuse_activations": False, "merge": False}),
        ):
            ev = PopulationEvaluator(scorer, dfo.arch, dfo.hooks, [batch], **kw)
            table, ms = _profile(ev, dfo, zs)
            text.append(f"== {shape}, generation at layer 0, {name} ({ms:.2f} ms GPU)\n{table}")
            print(text[-1].split("\n", 2)[0], text[-1].split("\n", 2)[1], flush=True)
        (out / f"profile_{shape}.txt").write_text("\n".join(text))
        dfo.remove()
        del model, dfo, loaded, scorer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
