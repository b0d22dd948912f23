"""A whole-model engine pass (GraphedPass: the multi-tensor launches an optimizer replays) on the
parameter set of an OPT model, bf16, as % of the copy ceiling for reading and writing every
weight once; and the low-rank tile of the multi-tensor kernel swept on that set.

The shapes are OPT's (embeddings, per layer q/k/v/out and fc1/fc2 with biases, two LayerNorms,
a final LayerNorm): hundreds of tensors, most of them small, which is where one launch per tensor
loses to launch gaps and grid tails."""

import pytest
import torch
from conftest import device_median_ms

from zofast import perturb
from zofast.graphed import GraphedPass

OPT = {"opt-1.3b": (2048, 8192, 24), "opt-6.7b": (4096, 16384, 32)}


def opt_shapes(hidden: int, ffn: int, layers: int) -> list[tuple]:
    shapes = [(50272, hidden), (2050, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4 + [(ffn, hidden), (ffn,), (hidden, ffn)]
        shapes += [(hidden,)] * 5  # fc2 bias, two LayerNorms' weight and bias
    return shapes + [(hidden,), (hidden,)]


@pytest.fixture(scope="module", params=list(OPT))
def opt_weights(request):
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = [
        torch.randn(s, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        for s in opt_shapes(*OPT[request.param])
    ]
    yield request.param, tensors
    del tensors
    torch.cuda.empty_cache()


def eager_reference(tensors, ranks, seeds, v_seeds, scales, which):
    """One gaussian_ / lowrank_ call per tensor on copies of tensors[which]."""
    out = []
    for i in which:
        w = tensors[i].clone()
        if ranks[i]:
            perturb.lowrank_(w, seeds[i], [v_seeds[i]] * len(seeds[i]), ranks[i], scales[i])
        else:
            perturb.gaussian_(w, seeds[i], scales[i])
        out.append(w)
    return out


# (method, terms): a pipelined step's passes carry 1 (−2ε) and 3 terms (restore, update and
# next: the first two on one seed, so MeZO draws two normals per weight, not three); LOZO's
# terms share V. MeZO with 2 terms on two seeds is there to compare against.
PASSES = [("mezo", 1), ("mezo", 2), ("mezo", 3), ("lozo", 1), ("lozo", 3)]


def term_seeds(i: int, terms: int) -> list[int]:
    """Tensor i's seeds: distinct, except that 3 terms are a step's (restore, update, next)."""
    return [1000 + 3 * i + t for t in ([0, 0, 1] if terms == 3 else range(terms))]


@pytest.mark.parametrize("method,terms", PASSES, ids=[f"{m}-T{t}" for m, t in PASSES])
def test_model_pass(measure, opt_weights, method, terms):
    name, tensors = opt_weights
    ranks = [2 if method == "lozo" and w.dim() >= 2 else 0 for w in tensors]
    passes = GraphedPass(tensors, ranks, terms)
    seeds = [term_seeds(i, terms) for i in range(len(tensors))]
    v_seeds = [7 + i for i in range(len(tensors))]
    scales = [[1e-3 * (t + 1) for t in range(terms)] for _ in tensors]
    which = [0, 1, 2, 3, len(tensors) - 3, len(tensors) - 1]
    expected = eager_reference(tensors, ranks, seeds, v_seeds, scales, which)
    passes(seeds, v_seeds, scales)
    for i, want in zip(which, expected, strict=True):
        assert torch.equal(tensors[i], want), f"tensor {i} differs from its eager call"
    total = sum(w.numel() * w.element_size() for w in tensors)
    measure(
        lambda: passes(seeds, v_seeds, scales),
        2 * total,
        op=f"model_pass_{method}",
        model=name,
        dtype="bf16",
        shape=[len(tensors), total // 2],
        rank=2 if method == "lozo" else 0,
        terms=terms,
        backend="triton",
    )


@pytest.mark.parametrize("rank", [2, 8, 16])
def test_multi_lowrank_tiles(benchmark, copy_gbps, opt_weights, rank):
    """The multi-tensor low-rank pass (T = 1) over the model's matrices for several tiles;
    the median device time of each tile in extra_info (bandwidth as % of copy)."""
    from zofast.kernels.multi import MultiPass

    name, tensors = opt_weights
    matrices = [w for w in tensors if w.dim() >= 2]
    seeds = torch.arange(len(matrices) * 2, device="cuda").view(-1, 2)
    scales = torch.full((len(matrices), 1), 1e-3, device="cuda")
    total = 2 * sum(w.numel() * w.element_size() for w in matrices)
    found = {}
    tiles = [(16, 256), (32, 128), (32, 256), (64, 64), (64, 128), (128, 64), (128, 128)]
    for tile in tiles:
        for warps in (4, 8):
            plan = MultiPass(matrices, [rank] * len(matrices), 1, tile=tile, num_warps=warps)
            ms = device_median_ms(lambda plan=plan: plan.launch(seeds, scales))
            found[f"{tile[0]}x{tile[1]}/w{warps}"] = round(100 * total / ms / 1e6 / copy_gbps, 1)
    benchmark.extra_info.update(
        op="multi_lowrank_tiles", model=name, rank=rank, pct_of_copy_by_tile=found
    )
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.parametrize("terms", [1, 2])
def test_multi_gaussian_blocks(benchmark, copy_gbps, opt_weights, terms):
    """The multi-tensor full-rank pass (MeZO's) over every weight for several program sizes."""
    from zofast.kernels.multi import MultiPass

    name, tensors = opt_weights
    seeds = torch.arange(len(tensors) * (terms + 1), device="cuda").view(len(tensors), -1)
    scales = torch.full((len(tensors), terms), 1e-3, device="cuda")
    total = 2 * sum(w.numel() * w.element_size() for w in tensors)
    found = {}
    for block in (128, 256, 512, 1024):
        for warps in (4, 8):
            plan = MultiPass(
                tensors, [0] * len(tensors), terms, gaussian_block=block, num_warps=warps
            )
            ms = device_median_ms(lambda plan=plan: plan.launch(seeds, scales))
            found[f"{4 * block}/w{warps}"] = round(100 * total / ms / 1e6 / copy_gbps, 1)
    benchmark.extra_info.update(
        op=f"multi_gaussian_blocks_T{terms}", model=name, rank=0, pct_of_copy_by_tile=found
    )
    benchmark.pedantic(lambda: None, rounds=1)
