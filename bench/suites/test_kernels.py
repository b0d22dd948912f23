"""Perturbation kernels against the copy ceiling and against what peers do, in one run.

Every op is verified against a float64 reference on a slice before it is timed. Bytes moved by
an in-place pass: one read and one write of w (the floor for any perturbation)."""

import pytest
import torch

from zofast import perturb

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = [(4096, 4096), (5120, 5120), (5120, 20480), (8192, 8192), (4099, 4093), (1823, 781)]
RANKS = [1, 2, 4, 8, 16]
BACKENDS = ["triton", "cpp"]


def shape_id(shape):
    return f"{shape[0]}x{shape[1]}"


def pass_bytes(w):
    return 2 * w.numel() * w.element_size()


def check_close(result, reference64, dtype):
    err = (result.double() - reference64).abs()
    bound = torch.finfo(dtype).eps * reference64.abs() + 64 * torch.finfo(torch.float32).eps
    assert torch.all(err <= bound), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian(measure, dtype, shape, backend):
    w = torch.randn(shape, device="cuda").to(DTYPES[dtype])
    rows = slice(0, 7)
    z = perturb.gaussian_noise(shape, 11, device="cuda")[rows].double()
    expected = w[rows].double() + 1e-3 * z
    check_close(perturb.gaussian_(w.clone(), 11, 1e-3, backend=backend)[rows], expected, w.dtype)
    measure(
        lambda: perturb.gaussian_(w, 11, 1e-3, backend=backend),
        pass_bytes(w),
        op="gaussian_",
        dtype=dtype,
        shape=list(shape),
        rank=None,
        terms=1,
        backend=backend,
    )


@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank(measure, dtype, shape, backend, rank, terms):
    w = torch.randn(shape, device="cuda").to(DTYPES[dtype])
    u_seeds, v_seeds = [1, 2][:terms], [3, 3][:terms]
    scales = [1e-3, -1e-3][:terms]
    u1, v = perturb.lowrank_factors(shape, 1, 3, rank, device="cuda")
    u = u1.double() * 1e-3
    if terms == 2:
        u = u - 1e-3 * perturb.lowrank_factors(shape, 2, 3, rank, device="cuda")[0].double()
    rows = slice(0, 7)
    expected = w[rows].double() + u[rows] @ v.double().T
    result = perturb.lowrank_(w.clone(), u_seeds, v_seeds, rank, scales, backend=backend)
    check_close(result[rows], expected, w.dtype)
    measure(
        lambda: perturb.lowrank_(w, u_seeds, v_seeds, rank, scales, backend=backend),
        pass_bytes(w),
        op="lowrank_",
        dtype=dtype,
        shape=list(shape),
        rank=rank,
        terms=terms,
        backend=backend,
    )


@pytest.mark.parametrize("shape", SHAPES[:4], ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mezo_pattern(measure, dtype, shape):
    """MeZO's code: z = torch.normal(...) materialised, then p += eps * z."""
    w = torch.randn(shape, device="cuda").to(DTYPES[dtype])
    gen = torch.Generator(device="cuda").manual_seed(0)

    def mezo():
        z = torch.normal(0, 1, size=w.shape, device=w.device, dtype=w.dtype, generator=gen)
        w.add_(z, alpha=1e-3)

    measure(
        mezo,
        pass_bytes(w),
        op="mezo_pattern",
        dtype=dtype,
        shape=list(shape),
        rank=None,
        terms=1,
        backend="torch",
    )


@pytest.mark.parametrize("rank", [2, 16])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lozo_pattern(measure, dtype, shape, rank):
    """LOZO's code: u, v drawn, the product u @ v.T materialised, then p += eps * (u @ v.T)."""
    w = torch.randn(shape, device="cuda").to(DTYPES[dtype])
    gen = torch.Generator(device="cuda").manual_seed(0)

    def lozo():
        u = torch.randn(shape[0], rank, device=w.device, dtype=w.dtype, generator=gen)
        v = torch.randn(shape[1], rank, device=w.device, dtype=w.dtype, generator=gen)
        w.add_(u @ v.T, alpha=1e-3)

    measure(
        lozo,
        pass_bytes(w),
        op="lozo_pattern",
        dtype=dtype,
        shape=list(shape),
        rank=rank,
        terms=1,
        backend="torch",
    )


@pytest.mark.parametrize("rank", [2, 16])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_addmm(measure, dtype, shape, rank):
    """torch.addmm(W, U, Vᵀ, out=W): the best a plain torch user gets with U, V stored."""
    w = torch.randn(shape, device="cuda").to(DTYPES[dtype])
    u = torch.randn(shape[0], rank, device="cuda", dtype=w.dtype)
    v = torch.randn(shape[1], rank, device="cuda", dtype=w.dtype)
    measure(
        lambda: torch.addmm(w, u, v.T, alpha=1e-3, out=w),
        pass_bytes(w),
        op="addmm",
        dtype=dtype,
        shape=list(shape),
        rank=rank,
        terms=1,
        backend="torch",
    )


def graphed(fn):
    """fn captured once in a CUDA graph (how an optimizer replays a pass): returns its replay."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank_graphed(measure, dtype, shape, rank):
    """lowrank_ with device seed tensors, replayed from a CUDA graph: no Python per call."""
    w = torch.randn(shape, device="cuda").to(DTYPES[dtype])
    u_seeds = torch.tensor([1], device="cuda")
    v_seeds = torch.tensor([3], device="cuda")
    scales = torch.tensor([1e-3], device="cuda")
    start = w.clone()
    replay = graphed(lambda: perturb.lowrank_(w, u_seeds, v_seeds, rank, scales))
    w.copy_(start)
    replay()
    assert torch.equal(w, perturb.lowrank_(start, 1, 3, rank, 1e-3))
    measure(
        replay,
        pass_bytes(w),
        op="lowrank_graphed",
        dtype=dtype,
        shape=list(shape),
        rank=rank,
        terms=1,
        backend="triton",
    )


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_graphed(measure, dtype, shape):
    w = torch.randn(shape, device="cuda").to(DTYPES[dtype])
    seeds = torch.tensor([11], device="cuda")
    scales = torch.tensor([1e-3], device="cuda")
    start = w.clone()
    replay = graphed(lambda: perturb.gaussian_(w, seeds, scales))
    w.copy_(start)
    replay()
    assert torch.equal(w, perturb.gaussian_(start, 11, 1e-3))
    measure(
        replay,
        pass_bytes(w),
        op="gaussian_graphed",
        dtype=dtype,
        shape=list(shape),
        rank=None,
        terms=1,
        backend="triton",
    )
