"""GPU-only checks of the contract: Triton on the GPU and the CUDA extension give bit-identical
normals and perturbations, and the same integers and uniforms as the C++ code on the CPU."""

import pytest
import torch

from zofast import perturb, rng
from zofast._ext import has_extension
from zofast.graphed import GraphedPass

pytestmark = pytest.mark.gpu

# The checks against the CUDA / C++ extension need it built (`ZOFAST_NO_EXTENSION=1` installs skip
# them); the Triton-only checks run either way.
needs_extension = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_extension(torch.device("cuda"))),
    reason="zofast's compiled extension is not built",
)

N_SAMPLES = 2**22


@needs_extension
def test_triton_and_cuda_normals_bit_exact():
    offsets = torch.arange(N_SAMPLES, dtype=torch.int64, device="cuda") + 2**40 - 5
    for seed in (0, 1234, 2**64 - 1):
        triton_z = rng.normal(seed, offsets, backend="triton")
        cuda_z = rng.normal(seed, offsets, backend="cpp")
        assert torch.equal(triton_z, cuda_z), f"seed {seed}: {(triton_z != cuda_z).sum()} differ"
        noise_triton = perturb.gaussian_noise((N_SAMPLES,), seed, device="cuda", backend="triton")
        noise_cuda = perturb.gaussian_noise((N_SAMPLES,), seed, device="cuda", backend="cpp")
        assert torch.equal(noise_triton, noise_cuda)


@needs_extension
def test_gpu_integers_and_uniforms_equal_cpu():
    gen = torch.Generator().manual_seed(5)
    counters = torch.randint(0, 2**32, (1 << 16, 4), generator=gen, dtype=torch.int64)
    cpu = rng.philox4x32(counters, (0x12345678, 0x9ABCDEF0), backend="cpp")
    for backend in ("triton", "cpp"):
        gpu = rng.philox4x32(counters.cuda(), (0x12345678, 0x9ABCDEF0), backend=backend)
        assert torch.equal(gpu.cpu(), cpu), backend
    offsets = torch.arange(1 << 20, dtype=torch.int64)
    cpu_u = rng.uniform(77, offsets, backend="cpp")
    for backend in ("triton", "cpp"):
        assert torch.equal(rng.uniform(77, offsets.cuda(), backend=backend).cpu(), cpu_u)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1823, 781), (4096, 4096), (1, 98432)])
def test_triton_and_cuda_perturbations_bit_exact(dtype, shape):
    w = torch.randn(shape, device="cuda").to(dtype)
    a = perturb.gaussian_(w.clone(), [3, 4], [1e-3, -2e-3], backend="triton")
    b = perturb.gaussian_(w.clone(), [3, 4], [1e-3, -2e-3], backend="cpp")
    assert torch.equal(a, b)
    for rank in sorted({1, min(16, *shape)}):
        c = perturb.lowrank_(w.clone(), [5, 6], [7, 8], rank, [1e-3, 1e-3], backend="triton")
        d = perturb.lowrank_(w.clone(), [5, 6], [7, 8], rank, [1e-3, 1e-3], backend="cpp")
        assert torch.equal(c, d)


@needs_extension
def test_gpu_matches_cpu_within_rounding():
    w = torch.randn(513, 257)
    cpu = perturb.lowrank_(w.clone(), 1, 2, 4, 1e-2, backend="cpp")
    gpu = perturb.lowrank_(w.cuda(), 1, 2, 4, 1e-2, backend="triton").cpu()
    assert (cpu - gpu).abs().max() <= 4 * torch.finfo(torch.float32).eps * w.abs().max()


@needs_extension
def test_gaussian_under_cuda_graph_reads_seeds_from_device_memory():
    w = torch.randn(1000, 333, device="cuda")
    seeds = torch.tensor([1, 2], dtype=torch.int64, device="cuda")
    scales = torch.tensor([1e-3, -1e-3], device="cuda")
    for backend in ("triton", "cpp"):
        captured = w.clone()
        perturb.gaussian_(captured.clone(), seeds, scales, backend=backend)  # compile outside
        graph = torch.cuda.CUDAGraph()
        start = captured.clone()
        with torch.cuda.graph(graph):
            perturb.gaussian_(captured, seeds, scales, backend=backend)
        for new in ([5, 6], [2**63 - 1, 7]):
            captured.copy_(start)
            seeds.copy_(torch.tensor(new))
            graph.replay()
            eager = perturb.gaussian_(start.clone(), new, [1e-3, -1e-3], backend=backend)
            assert torch.equal(captured, eager), (backend, new)


@needs_extension
def test_lowrank_under_cuda_graph_reads_seeds_from_device_memory():
    w = torch.randn(777, 333, device="cuda", dtype=torch.bfloat16)
    u_seeds = torch.tensor([1, 2], dtype=torch.int64, device="cuda")
    v_seeds = torch.tensor([3, 4], dtype=torch.int64, device="cuda")
    scales = torch.tensor([1e-2, -1e-2], device="cuda")
    for backend in ("triton", "cpp"):
        captured = w.clone()
        perturb.lowrank_(captured.clone(), u_seeds, v_seeds, 4, scales, backend=backend)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            perturb.lowrank_(captured, u_seeds, v_seeds, 4, scales, backend=backend)
        for new_u in ([5, 6], [-1, 7]):
            captured.copy_(w)
            u_seeds.copy_(torch.tensor(new_u))
            graph.replay()
            eager = perturb.lowrank_(
                w.clone(), [u % 2**64 for u in new_u], [3, 4], 4, [1e-2, -1e-2], backend=backend
            )
            assert torch.equal(captured, eager), (backend, new_u)


def test_graphed_pass_equals_eager_calls():
    gen = torch.Generator(device="cuda").manual_seed(3)
    shapes = [(300, 200), (64,), (17, 3, 5), (1000,), (2048, 512)]
    ranks = [4, 0, 2, 0, 1]
    tensors = [torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16) for s in shapes]
    expected = [t.clone() for t in tensors]
    passes = GraphedPass(tensors, ranks, n_terms=3)
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected, strict=True))
    for step in range(3):
        seeds = [[100 * step + 10 * i + t for t in range(3)] for i in range(len(shapes))]
        v_seeds = [7 + step + i for i in range(len(shapes))]
        scales = [[1e-2, -2e-2 * (step + 1), 5e-3] for _ in shapes]
        passes(seeds, v_seeds, scales)
        for e, r, s, v, sc in zip(expected, ranks, seeds, v_seeds, scales, strict=True):
            if r:
                perturb.lowrank_(e, s, [v] * 3, r, sc)
            else:
                perturb.gaussian_(e, s, sc)
        for t, e in zip(tensors, expected, strict=True):
            assert torch.equal(t, e), step


@pytest.mark.filterwarnings("ignore:mode='inplace' on")  # in place is what this compares
@pytest.mark.parametrize("method", ["lozo", "mezo"])
@pytest.mark.parametrize("pipeline", [False, True])
def test_optimizer_graphed_passes_equal_eager_passes(method, pipeline):
    """The same run with CUDA-graphed passes and with eager per-tensor passes, in lockstep: the
    losses and the weights agree bit for bit after every step (the first difference is named)."""
    from zofast.optim import LOZO, MeZO

    def make(graphs: bool):
        torch.manual_seed(0)
        model = (
            torch.nn.Sequential(
                torch.nn.Linear(64, 48), torch.nn.LayerNorm(48), torch.nn.Linear(48, 5)
            )
            .cuda()
            .to(torch.bfloat16)
        )
        cls, extra = (LOZO, {"rank": 2, "nu": 3}) if method == "lozo" else (MeZO, {})
        opt = cls(
            model.parameters(), lr=1e-2, eps=1e-2, seed=5, pipeline=pipeline, mode="inplace",
            **extra,
        )  # fmt: skip
        if not graphs:
            opt._inplace.passes.graphs = None
        return model, opt

    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    runs = [make(True), make(False)]
    for i in range(7):
        losses = []
        for model, opt in runs:
            calls = []

            def closure(model=model, calls=calls, nan=i == 4):  # a NaN second loss, a retry
                calls.append(1)
                loss = model(x).float().pow(2).mean()
                return loss * (float("nan") if nan and calls[1:] else 1)

            if i == 4:
                with pytest.raises(FloatingPointError):
                    opt.step(closure)
            losses.append(opt.step(lambda model=model: model(x).float().pow(2).mean()))
        assert losses[0] == losses[1], f"step {i}: losses {losses}"
        for k, (a, b) in enumerate(zip(*(m.parameters() for m, _ in runs), strict=True)):
            assert torch.equal(a, b), f"step {i}, parameter {k}: {(a != b).sum().item()} differ"
    for _, opt in runs:
        opt.settle()
    assert runs[0][1]._inplace.passes.graphs, "no graph was used"
    queued = "losses" in runs[0][1]._inplace.passes.host_buffers
    assert queued, "the last pass was never queued behind the forward"
    for a, b in zip(*(m.parameters() for m, _ in runs), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_virtual_mode_same_iterates_as_inplace_on_gpu(momentum):
    """LOZO mode="virtual" on CUDA (hooks on Linear / Embedding / tied head of a tiny OPT, the
    positional embedding and vectors in place through the graphed pass): float32 losses and
    weights agree with in-place LOZO to rounding, across two V refreshes."""
    import transformers

    from zofast.optim import LOZO

    config = transformers.OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        vocab_size=96, max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        attn_implementation="eager",
    )  # fmt: skip
    ids = torch.randint(
        3, 96, (4, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(1)
    )
    runs = []
    for mode in ("inplace", "virtual"):
        torch.manual_seed(0)
        model = transformers.OPTForCausalLM(config).cuda().eval()
        opt = LOZO(
            model, lr=1e-3, eps=1e-2, rank=2, nu=3, momentum=momentum, seed=4, mode=mode,
            pipeline=True,
        )  # fmt: skip
        losses = []
        for _ in range(8):
            opt.step(lambda model=model: model(input_ids=ids, labels=ids).loss)
            losses.append(opt.last_losses)
        opt.settle()
        if mode == "virtual":
            graphed = opt._inplace.passes.graphs
            assert opt.virtual_names and graphed, "virtual tensors and a graphed pass"
            opt.detach()
        runs.append((torch.tensor(losses, dtype=torch.float64), list(model.parameters())))
    (loss_in, w_in), (loss_v, w_v) = runs
    torch.testing.assert_close(loss_v, loss_in, rtol=1e-4, atol=0)  # g: ΔL / 2ε amplifies
    for a, b in zip(w_v, w_in, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())


def _int_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1823, 781), (4096, 4096)])
def test_triton_and_cuda_stochastic_rounding_w_scale_and_out_bit_exact(dtype, shape):
    """round_seed, w_scale and out= on the GPU: Triton and the CUDA ops give the same bits (the
    normals are bit-exact there), also for an unaligned column shard (Triton's per-element words)
    and explicit factors; out= leaves w untouched and equals the in-place result."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    w = (0.02 * torch.randn(shape, device="cuda", generator=gen)).to(dtype)
    before = w.clone()
    opts = dict(round_seed=2**64 - 99, w_scale=1 - 1e-4)
    runs = {}
    for backend in ("triton", "cpp"):
        out = torch.full_like(w, float("nan"))
        g = perturb.gaussian_(w, [3, 4], [1e-5, -2e-5], out=out, backend=backend, **opts)
        inplace = perturb.gaussian_(w.clone(), [3, 4], [1e-5, -2e-5], backend=backend, **opts)
        assert torch.equal(_int_bits(g), _int_bits(inplace)), backend
        low = perturb.lowrank_(
            w.clone(), [5, 6], [7, 7], 4, [1e-5, 1e-5], row_offset=3, backend=backend, **opts
        )
        part = w[:, 5:].contiguous()
        shard = perturb.lowrank_(part, 5, 7, 4, 1e-5, col_offset=5, backend=backend, **opts)
        left = 1e-5 * torch.ones(shape[0], 2, device="cuda")
        right = torch.ones(shape[1] - 3, 2, device="cuda")
        outer = perturb.outer_add_(
            w[:, 3:].contiguous(), left, right, col_offset=3, backend=backend, **opts
        )
        runs[backend] = (g, low, shard, outer)
    assert torch.equal(_int_bits(w), _int_bits(before))
    for a, b in zip(runs["triton"], runs["cpp"], strict=True):
        assert torch.equal(_int_bits(a), _int_bits(b))
    if dtype != torch.float32:  # tiny updates: round to nearest would keep most weights
        nearest = perturb.gaussian_(w.clone(), [3, 4], [1e-5, -2e-5], w_scale=1 - 1e-4)
        assert (runs["triton"][0] != nearest).any()


def test_graphed_pass_stochastic_and_scaled_equal_eager_calls():
    gen = torch.Generator(device="cuda").manual_seed(4)
    shapes = [(300, 200), (64,), (17, 3, 5), (1000,), (2048, 512)]
    ranks = [4, 0, 2, 0, 1]
    tensors = [torch.randn(s, device="cuda", generator=gen).to(torch.bfloat16) for s in shapes]
    expected = [t.clone() for t in tensors]
    passes = GraphedPass(tensors, ranks, n_terms=2, stochastic=True, scaled=True)
    assert passes._seeds.shape == (5, 4) and passes._scales.shape == (5, 3)
    for step in range(3):
        seeds = [[100 * step + 10 * i + t for t in range(2)] for i in range(len(shapes))]
        v_seeds = [7 + step + i for i in range(len(shapes))]
        scales = [[1e-4, -2e-4 * (step + 1)] for _ in shapes]
        round_seeds = [2**64 - 1 - 17 * step - i for i in range(len(shapes))]
        w_scales = [1 - 1e-3 * (i + step) for i in range(len(shapes))]
        passes(seeds, v_seeds, scales, round_seeds=round_seeds, w_scales=w_scales)
        for e, r, s, v, sc, rs, a in zip(
            expected, ranks, seeds, v_seeds, scales, round_seeds, w_scales, strict=True
        ):
            if r:
                perturb.lowrank_(e, s, [v] * 2, r, sc, round_seed=rs, w_scale=a)
            else:
                perturb.gaussian_(e, s, sc, round_seed=rs, w_scale=a)
        for t, e in zip(tensors, expected, strict=True):
            assert torch.equal(t, e), step
    with pytest.raises(ValueError, match="round_seeds"):
        passes(seeds, v_seeds, scales, w_scales=w_scales)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1823, 781), (4099, 4093), (64, 8208)])
def test_one_launch_equals_two_launches(monkeypatch, dtype, shape):
    """The eager one-launch lowrank_ (factors drawn in the kernel, seeds as arguments) and
    gaussian_ (seeds as arguments) give the factor + apply launches' bits from staged tables."""
    w = torch.randn(shape, device="cuda").to(dtype)
    calls = [
        lambda r: perturb.lowrank_(w.clone(), 2**64 - 5, 2**63 + 7, r, 1e-3),
        lambda r: perturb.lowrank_(
            w.clone(),
            [5, 6, 7],
            [8, 9, 8],
            r,
            [1e-3, -2e-3, 5e-4],
            round_seed=2**64 - 1,
            w_scale=0.999,
            row_offset=3,
            col_offset=5,
        ),
        lambda r: perturb.lowrank_(
            w.clone(), [1, 2, 3, 4, 5], [6] * 5, r, [1e-3] * 5, round_seed=9
        ),
        lambda r: perturb.gaussian_(w.clone(), [3, 3, 2**63], [1e-3, -1e-3, 2e-3], round_seed=4),
    ]
    for rank in (1, 3, 8, 16):
        for call in calls:
            one = call(rank)
            monkeypatch.setattr(perturb, "_ONE_LAUNCH", False)
            two = call(rank)
            monkeypatch.setattr(perturb, "_ONE_LAUNCH", True)
            assert torch.equal(one, two), (rank, (one != two).sum().item())
