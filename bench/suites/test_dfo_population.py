"""DFO-LoRA candidate evaluations per second: population-batched vs one candidate per forward.

Models: RoBERTa-large-shaped (24 layers, hidden 1024, 16 heads, FFN 4096, vocab 50265, MLM head)
and GPT-2-large-shaped (36 layers, hidden 1280, 20 heads, vocab 50257, LM head), random weights
built from configs directly on the GPU, in bfloat16 (what one would run these sizes in; the
default SDPA attention). Batch: 32 examples, right-padded rows of 48-64 tokens (64 wide), the
SST-2 prompt's label words scored by :class:`zofast.scoring.Scorer` (mask position for RoBERTa,
last token for GPT-2). DFO-LoRA: rank 4, d = 500 (query and key), popsize 20, every layer with a
non-zero incumbent (as during a search, so every layer's hooks are active).

* batched: one round, i.e. one generation of 20 candidates for every layer in turn, through
  :class:`~zofast.dfo.population.PopulationEvaluator` (input of the searched layer cached, the
  layers above run on the 20 stacked copies); includes turning search vectors into factors
  (projection regeneration when the projections are not cached: GPT-2-large's are not).
  The batched path runs with its defaults: the last layer's per-token tail on the scored rows
  only, the one-kernel tanh-GELU and the incumbents merged into swapped-in weights
  (:mod:`zofast.dfo.population`, steps 3-5). The same round is also timed with all three
  switched off (``batched_plain_*`` in extra_info), without the merge only
  (``batched_no_merge_*``), and with the defaults on the rows split by length into two batches
  of 16, each as wide as its longest row (``batched_buckets2_*``: less padding, two forwards per
  generation; the sequential loop keeps the one 64-wide batch), to attribute the gains.
* sequential: the published code's loop, one forward of the whole model per candidate (the
  same factors, the model as it is), timed on 20 candidates of each of 4 layers (its cost does
  not depend on the layer); median of 3 repetitions. For transparency the same loop is also
  timed with the one-kernel tanh-GELU (``sequential_fused_*``; GPT-2 only, RoBERTa has no
  tanh-GELU), so the speed-up from batching alone can be read off as well.

Search vectors: incumbents 0.02·N(0, 1), candidates 0.05·N(0, 1) with ``init="random"``
(factor entries of std 0.02 and 0.05: updates of the order of the projections themselves, as
in a search; much larger ones saturate the attention softmax of a random-weight model, where
rounding differences between any two evaluation orders are amplified without bound).

Before timing, batched and sequential losses of the same candidates are compared on 4 layers,
first with the model in float32 (tolerance 1e-3: they must agree up to rounding), then in bf16
(loose tolerance: bf16 rounding through 24-36 layers of random weights, with different kernels
for 32 and 640 rows, moves the losses by a few 1e-2; the maximum is stored in extra_info).
extra_info also holds evals/s of both, the speed-up and the peak memory.
Runs in well under two minutes on an H200; needs no cma (no optimizer runs). With the
environment variable ``DFO_BENCH_OUT`` set to a file name, every shape's record is also written
there as soon as it is measured (JSON list; ``ZOFAST_COMMIT`` is recorded as the commit, for
machines without ``.git``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from zofast.dfo.lora import DFOLoRA
from zofast.dfo.population import PopulationEvaluator
from zofast.encoding import Batch
from zofast.models import LoadedModel
from zofast.scoring import Scorer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from helpers_models import make_tokenizer  # noqa: E402

POPSIZE = 20
EXAMPLES = 32
WIDTH = 64
SEQUENTIAL_LAYERS = 4
DTYPE = torch.bfloat16
Z_INCUMBENT = 0.02
Z_CANDIDATE = 0.05
FP32_TOL = 1e-3
BF16_TOL = 0.25


def _config(name: str):
    if name == "roberta-large":
        config = transformers.RobertaConfig(
            vocab_size=50265,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=514,
            type_vocab_size=1,
            pad_token_id=1,
        )
        return config, transformers.RobertaForMaskedLM, "mlm", "roberta"
    config = transformers.GPT2Config(
        vocab_size=50257, n_embd=1280, n_layer=36, n_head=20, n_positions=1024
    )
    return config, transformers.GPT2LMHeadModel, "causal", "gpt2"


def _batch(scorer: Scorer, kind: str, tokenizer, gen: torch.Generator) -> Batch:
    lengths = torch.randint(48, WIDTH + 1, (EXAMPLES,), generator=gen)
    lengths[0] = WIDTH
    ids = torch.randint(10, len(tokenizer) - 1, (EXAMPLES, WIDTH), generator=gen)
    mask = torch.arange(WIDTH)[None, :] < lengths[:, None]
    ids = torch.where(mask, ids, torch.full_like(ids, scorer.pad_token_id))
    if kind == "mlm":
        positions = lengths - 3
        ids[torch.arange(EXAMPLES), positions] = tokenizer.mask_token_id
    else:
        positions = lengths - 1
    return Batch(
        input_ids=ids,
        attention_mask=mask.long(),
        labels=torch.randint(0, 2, (EXAMPLES,), generator=gen),
        positions=positions,
        num_examples=EXAMPLES,
        rows_per_copy=EXAMPLES,
    ).to("cuda")


def _split_by_length(batch: Batch, parts: int) -> list[Batch]:
    """The rows sorted by length in ``parts`` batches, each as wide as its longest row."""
    lengths = batch.attention_mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    out = []
    for idx in torch.tensor_split(order, parts):
        width = int(lengths[idx].max())
        out.append(
            Batch(
                input_ids=batch.input_ids[idx, :width],
                attention_mask=batch.attention_mask[idx, :width],
                labels=batch.labels[idx],
                positions=batch.positions[idx],
                num_examples=len(idx),
                rows_per_copy=len(idx),
            )
        )
    return out


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _check(loaded: LoadedModel, scorer: Scorer, batch: Batch, tol: float) -> float:
    """Batched vs sequential losses of the same candidates on 4 layers; returns the max error."""
    dfo = DFOLoRA(loaded, rank=4, intrinsic_dim=500, popsize=POPSIZE, seed=1, init="random")
    rng = np.random.default_rng(0)
    try:
        dfo.set_z(Z_INCUMBENT * rng.standard_normal((dfo.num_layers, dfo.intrinsic_dim)))
        evaluator = PopulationEvaluator(scorer, dfo.arch, dfo.hooks, [batch])
        assert evaluator.mode == "replay", evaluator.fallback_reason
        zs = Z_CANDIDATE * rng.standard_normal((POPSIZE, dfo.intrinsic_dim))
        worst = 0.0
        with torch.no_grad():
            for layer in _sampled_layers(dfo.num_layers):
                mats = dfo.factors(layer, zs)
                batched = evaluator.losses(layer, mats).float()
                sequential = evaluator.sequential_losses(layer, mats).float()
                err = float((batched - sequential).abs().max())
                assert err <= tol * max(1.0, float(sequential.abs().max())), (layer, err)
                worst = max(worst, err)
        return worst
    finally:
        dfo.remove()


def _sampled_layers(num_layers: int) -> list[int]:
    return np.linspace(0, num_layers - 1, SEQUENTIAL_LAYERS).round().astype(int).tolist()


@pytest.mark.parametrize("shape", ["roberta-large", "gpt2-large"])
def test_population_speedup(benchmark, shape):
    config, cls, kind, style = _config(shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(config).eval()
    tokenizer = make_tokenizer(style)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, kind=kind, name=shape)
    scorer = Scorer(loaded, "sst-2")
    gen = torch.Generator().manual_seed(0)
    batch = _batch(scorer, kind, tokenizer, gen)
    fp32_err = _check(loaded, scorer, batch, FP32_TOL)
    model.to(DTYPE)
    bf16_err = _check(loaded, scorer, batch, BF16_TOL)

    dfo = DFOLoRA(loaded, rank=4, intrinsic_dim=500, popsize=POPSIZE, seed=1, init="random")
    rng = np.random.default_rng(0)
    dfo.set_z(Z_INCUMBENT * rng.standard_normal((dfo.num_layers, dfo.intrinsic_dim)))
    evaluator = PopulationEvaluator(scorer, dfo.arch, dfo.hooks, [batch])
    dfo.evaluator = evaluator
    zs = Z_CANDIDATE * rng.standard_normal((POPSIZE, dfo.intrinsic_dim))
    layers = _sampled_layers(dfo.num_layers)

    with torch.no_grad():

        def one_round():
            for layer in range(dfo.num_layers):
                dfo._evaluate(layer, zs)

        def sequential_loop():
            for layer in layers:
                evaluator.sequential_losses(layer, dfo.factors(layer, zs))

        one_round()
        sequential_loop()
        torch.cuda.reset_peak_memory_stats()
        seq_seconds = float(np.median([_sync_time(sequential_loop) for _ in range(3)]))
        seq_rate = POPSIZE * len(layers) / seq_seconds
        round_seconds = [_sync_time(one_round) for _ in range(3)]
        peak = torch.cuda.max_memory_allocated()
        seq_fused_rate = None
        if evaluator._activations:
            with evaluator.fused_activations():
                sequential_loop()
                fused_s = float(np.median([_sync_time(sequential_loop) for _ in range(3)]))
            seq_fused_rate = POPSIZE * len(layers) / fused_s
        variant_round_s = {}
        variants = {
            "plain": ([batch], {"trim": False, "fuse_activations": False, "merge": False}),
            "no_merge": ([batch], {"merge": False}),
            "buckets2": (_split_by_length(batch, 2), {}),
        }
        for name, (batches, options) in variants.items():
            dfo.evaluator = PopulationEvaluator(scorer, dfo.arch, dfo.hooks, batches, **options)
            one_round()
            variant_round_s[name] = float(np.median([_sync_time(one_round) for _ in range(3)]))
            if name == "buckets2":
                mats = dfo.factors(layers[1], zs)
                diff = dfo.evaluator.losses(layers[1], mats) - evaluator.losses(layers[1], mats)
                assert float(diff.abs().max()) <= BF16_TOL, name
        dfo.evaluator = evaluator
        plain_round_s = variant_round_s["plain"]

        def synchronised():
            one_round()
            torch.cuda.synchronize()

        benchmark.pedantic(synchronised, rounds=3, iterations=1, warmup_rounds=0)

    round_s = float(np.median(round_seconds))
    batched_rate = POPSIZE * dfo.num_layers / round_s
    benchmark.extra_info.update(
        shape=shape,
        dtype=str(DTYPE).replace("torch.", ""),
        layers=dfo.num_layers,
        popsize=POPSIZE,
        examples=EXAMPLES,
        width=WIDTH,
        mode=evaluator.mode,
        projections_cached=dfo._keep_all_projections(),
        batched_round_s=round_s,
        batched_evals_per_s=batched_rate,
        sequential_evals_per_s=seq_rate,
        speedup=batched_rate / seq_rate,
        trimmed=evaluator.trimmed,
        trim_reason=evaluator.trim_reason,
        fused_activation_modules=len(evaluator._activations),
        batched_plain_round_s=plain_round_s,
        batched_plain_evals_per_s=POPSIZE * dfo.num_layers / plain_round_s,
        batched_no_merge_evals_per_s=POPSIZE * dfo.num_layers / variant_round_s["no_merge"],
        batched_buckets2_evals_per_s=POPSIZE * dfo.num_layers / variant_round_s["buckets2"],
        speedup_buckets2=POPSIZE * dfo.num_layers / variant_round_s["buckets2"] / seq_rate,
        sequential_fused_evals_per_s=seq_fused_rate,
        speedup_vs_sequential_fused=None
        if seq_fused_rate is None
        else batched_rate / seq_fused_rate,
        max_loss_diff_fp32=fp32_err,
        max_loss_diff_bf16=bf16_err,
        peak_bytes=peak,
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        commit=os.environ.get("ZOFAST_COMMIT"),
    )
    out = os.environ.get("DFO_BENCH_OUT")
    if out:
        path = Path(out)
        records = json.loads(path.read_text()) if path.is_file() else []
        records.append(dict(benchmark.extra_info))
        path.write_text(json.dumps(records, indent=1) + "\n")
    print(
        f"\n{shape}: batched {batched_rate:.0f} evals/s, sequential {seq_rate:.0f} evals/s, "
        f"speed-up {batched_rate / seq_rate:.1f}x (plain batched "
        f"{POPSIZE * dfo.num_layers / plain_round_s:.0f} evals/s, sequential fused "
        f"{seq_fused_rate}), mode {evaluator.mode}, trimmed {evaluator.trimmed}, "
        f"peak {peak / 2**30:.1f} GiB, max |batched - sequential| loss fp32 {fp32_err:.2g}, "
        f"bf16 {bf16_err:.2g}"
    )
