"""Data-parallel steps (process_group=) with two gloo processes on the CPU: every optimizer, in
place (float32) and in its default exact mode (bf16). The ranks hold shards of 3 and 5 examples
of one batch of 8; their weights must stay bit-identical to each other and equal one process
stepping on the whole batch, and ranks that disagree are refused before anything is written.
FSDP2 (fully_shard): each rank perturbs its own shard, with the noise of the whole tensor; with
mixed precision (float32 shards, bf16 forwards) the steps are those of one process computing the
same bf16 forwards. Several directions per step: split="directions" (each rank evaluates its own
directions on the whole batch) equals the same q directions in one process bit for bit;
split="batch" with q > 1 equals one process up to the rounding of the mean losses."""

import contextlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zofast.optim import LOZO, MeZO

STEPS = 12
SHARDS = [(0, 3), (3, 8)]  # rank r takes examples SHARDS[r]
CASES = [
    (method, dtype) for method in ("mezo", "lozo", "lozo-m") for dtype in ("float32", "bfloat16")
]


def new_model(dtype: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1)
    ).to(getattr(torch, dtype))


def new_optimizer(method: str, model, seed: int = 3, process_group=None, **kwargs):
    common = dict(lr=1e-2, eps=1e-2, seed=seed, process_group=process_group, **kwargs)
    if method == "mezo":
        return MeZO(model, **common)
    return LOZO(model, rank=2, nu=4, momentum=0.9 if method == "lozo-m" else 0.0, **common)


def make(method: str, dtype: str, seed: int = 3, process_group=None, **kwargs):
    model = new_model(dtype)
    return model, new_optimizer(method, model, seed, process_group, **kwargs)


def batch(dtype: str):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=gen).to(getattr(torch, dtype))
    y = torch.randn(8, 1, generator=gen)
    return x, y


def train(method, dtype, rows, process_group=None, seed=3, **kwargs):
    model, opt = make(method, dtype, seed, process_group, **kwargs)
    x, y = batch(dtype)
    x, y = x[rows[0] : rows[1]], y[rows[0] : rows[1]]

    def closure():
        return ((model(x).float() - y) ** 2).mean()

    for _ in range(STEPS):
        opt.step(closure, examples=len(y))
    opt.settle()
    if opt.mode != "inplace":
        opt.detach()
    return model, opt


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str):
    """A gloo process group for one worker; on success every rank meets at a barrier before
    any tears the group down (a rank whose peer closed its connections first could abort)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def worker(rank: int, world: int, init_file: str) -> None:
    with gloo_group(rank, world, init_file):
        group = dist.group.WORLD
        for method, dtype in CASES:
            model, opt = train(method, dtype, SHARDS[rank], group)
            assert opt.exact == (dtype == "bfloat16"), (method, dtype, opt.mode)
            mine = flat(model)
            others = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(others, mine, group=group)
            assert all(torch.equal(mine, o) for o in others), (method, dtype, "ranks differ")
            alone, _ = train(method, dtype, (0, 8))
            want, start = flat(alone), flat(make(method, dtype)[0])
            assert not torch.equal(mine, start), (method, dtype, "nothing trained")
            if dtype == "float32":
                torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-6)
            else:  # g differs in its last bits, so some stochastic roundings go the other way
                torch.testing.assert_close(mine, want, rtol=2**-6, atol=2**-8)
        # Ranks that disagree (another run seed on rank 1): refused at the first step, untouched.
        model, opt = make("lozo", "float32", seed=3 + rank, process_group=group)
        start = flat(model)
        with pytest.raises(ValueError, match="disagree"):
            opt.step(lambda: model(torch.ones(2, 6)).pow(2).mean())
        assert torch.equal(flat(model), start)


def shard(model, mesh, mp_policy=None):
    """FSDP2 on the first two layers; the root (fully_shard(model)) owns the last one's
    parameters, which FSDP2 keeps gathered after a forward (zofast reshards them)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in model[:2]:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def bf16_forward(model, x):
    """What FSDP2's MixedPrecisionPolicy(param_dtype=bf16) computes: bf16 copies of the float32
    weights, bf16 inputs."""
    weights = {n: p.to(torch.bfloat16) for n, p in model.named_parameters()}
    return torch.func.functional_call(model, weights, (x.to(torch.bfloat16),))


def directions_worker(rank: int, world: int, init_file: str) -> None:
    with gloo_group(rank, world, init_file):
        group = dist.group.WORLD
        q = 3  # rank 0 evaluates directions 0 and 2, rank 1 direction 1
        for method in ("mezo", "lozo", "lozo-m"):
            for dtype, mode in (("bfloat16", "auto"), ("float32", "shadow")):
                options = dict(directions=q, mode=mode)
                model, opt = train(method, dtype, (0, 8), group, split="directions", **options)
                alone, alone_opt = train(method, dtype, (0, 8), **options)
                case = (method, dtype, mode)
                assert opt.trajectory.g.shape == (STEPS, q), case
                assert opt.trajectory == alone_opt.trajectory, (case, "g's differ")
                assert torch.equal(flat(model), flat(alone)), (case, "weights differ")
                assert not torch.equal(flat(model), flat(make(method, dtype)[0])), case
            # split="batch": every rank evaluates the q directions on its shard.
            model, _ = train(method, "float32", SHARDS[rank], group, directions=2)
            mine = flat(model)
            others = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(others, mine, group=group)
            assert all(torch.equal(mine, o) for o in others), (method, "ranks differ")
            alone, _ = train(method, "float32", (0, 8), directions=2)
            torch.testing.assert_close(mine, flat(alone), rtol=1e-5, atol=1e-6)
        # A NaN in rank 1's direction: every rank raises and keeps its weights bit for bit.
        model, opt = make("lozo", "bfloat16", process_group=group, directions=2, split="directions")
        start = flat(model)
        x, y = batch("bfloat16")

        def closure():
            loss = ((model(x).float() - y) ** 2).mean()
            return loss * float("nan") if rank == 1 else loss

        with pytest.raises(FloatingPointError, match="direction 1"):
            opt.step(closure)
        assert torch.equal(flat(model), start) and opt.trajectory.events == ["abort-"]
        # In place the ranks' roundings would differ: refused before anything is written.
        with pytest.raises(ValueError, match="exact mode"):
            make("mezo", "float32", process_group=group, directions=2, split="directions")
        # Ranks that disagree on q: refused at the first step, untouched.
        model, opt = make("lozo", "bfloat16", process_group=group, directions=2 + rank)
        start = flat(model)
        with pytest.raises(ValueError, match="disagree"):
            opt.step(lambda: model(torch.ones(2, 6, dtype=torch.bfloat16)).float().pow(2).mean())
        assert torch.equal(flat(model), start)


def fsdp_worker(rank: int, world: int, init_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    with gloo_group(rank, world, init_file):
        mesh = init_device_mesh("cpu", (world,))
        for method in ("mezo", "lozo", "lozo-m"):
            seen = {}
            models = {}
            for sharded in (False, True):
                model = new_model("float32")
                if sharded:
                    shard(model, mesh)
                group = dist.group.WORLD if sharded else None
                opt = new_optimizer(method, model, process_group=group)
                rows = SHARDS[rank] if sharded else (0, 8)
                x, y = batch("float32")
                x, y = x[rows[0] : rows[1]], y[rows[0] : rows[1]]
                perturbed = []

                def closure(model=model, x=x, y=y, perturbed=perturbed):
                    if not perturbed:  # the first forward: W + εZ, whole tensors
                        perturbed.extend(full(p) for p in model.parameters())
                    return ((model(x) - y) ** 2).mean()

                for _ in range(STEPS):
                    opt.step(closure, examples=len(y))
                seen[sharded], models[sharded] = perturbed, [full(p) for p in model.parameters()]
            for a, b in zip(seen[False], seen[True], strict=True):
                assert torch.equal(a, b), (method, "the shards' noise is not the whole tensor's")
            for a, b in zip(models[False], models[True], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

        # Mixed precision: float32 shards perturbed in place, forwards in bf16. One process on
        # the whole model, computing the same bf16 forwards on the same two row ranges and
        # weighing their losses as the all-reduce does, takes the same steps bit for bit.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        x, y = batch("float32")
        for method in ("mezo", "lozo", "lozo-m"):
            model = shard(new_model("float32"), mesh, policy)
            opt = new_optimizer(method, model, process_group=dist.group.WORLD)
            assert opt.mode == "inplace" and all(s.param.dtype == torch.float32 for s in opt._slots)
            lo, hi = SHARDS[rank]
            out = []

            def closure(model=model, x=x[lo:hi], y=y[lo:hi], out=out):
                prediction = model(x)
                out.append(prediction.dtype)
                return ((prediction.float() - y) ** 2).mean()

            alone = new_model("float32")
            opt_alone = new_optimizer(method, alone)

            def closure_alone(model=alone):
                losses = [
                    float(((bf16_forward(model, x[a:b]).float() - y[a:b]) ** 2).mean())
                    for a, b in SHARDS
                ]
                weights = [b - a for a, b in SHARDS]
                return sum(w * loss for w, loss in zip(weights, losses, strict=True)) / 8

            for _ in range(STEPS):
                opt.step(closure, examples=hi - lo)
                opt_alone.step(closure_alone)
            assert set(out) == {torch.bfloat16}
            assert opt.trajectory.to_dict()["events"] == opt_alone.trajectory.to_dict()["events"]
            for a, b in zip(alone.parameters(), model.parameters(), strict=True):
                assert torch.equal(a.detach(), full(b)), method

        # bf16 shards without mixed precision: one error, before anything is written.
        model = shard(new_model("bfloat16"), mesh)
        before = [full(p) for p in model.parameters()]
        with pytest.raises(ValueError, match="MixedPrecisionPolicy"):
            LOZO(model, lr=1e-2, process_group=dist.group.WORLD)
        with pytest.raises(ValueError, match="in place, not in mode='shadow'"):
            MeZO(model, lr=1e-2, mode="shadow", process_group=dist.group.WORLD)
        fp32 = shard(new_model("float32"), mesh)
        with pytest.raises(ValueError, match="need the model"):
            MeZO(list(fp32.parameters()), lr=1e-2, process_group=dist.group.WORLD)
        assert all(torch.equal(a, full(b)) for a, b in zip(before, model.parameters(), strict=True))


def full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_shards_take_the_whole_tensors_noise_and_mixed_precision_trains():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(fsdp_worker, args=(2, os.path.join(folder, "init")), nprocs=2, join=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_equal_one_process_and_each_other():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(2, os.path.join(folder, "init")), nprocs=2, join=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ranks_sharing_the_directions_equal_one_process():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(directions_worker, args=(2, os.path.join(folder, "init")), nprocs=2, join=True)


def test_process_group_needs_distributed():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="initialised"):
        MeZO(model, lr=1e-3, process_group=object())
