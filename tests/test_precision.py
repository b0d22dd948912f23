"""bf16 / fp16 training without the in-place random walk (FACTS §8): the exact modes.

* lr = 0: 1,000 steps of MeZO, LOZO and LOZO-M in each exact mode (shadow; virtual for LOZO),
  bf16 and fp16, leave every stored weight bit-equal to its start (in place moves 98 % of them:
  ``python bench/tools/precision.py drift``).
* A failing step (the closure raising an Exception or a KeyboardInterrupt inside the forward, or
  returning NaN, at the first or the second evaluation) leaves the stored weights, and what the
  model computes, bit-equal to before.
* The teacher–student regression of bench/tools/precision.py: bf16 with the default settings reaches
  ≥ 90 % of its float32 twin's loss reduction (in place with round-to-nearest does not).
"""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "bench_precision", Path(__file__).resolve().parents[1] / "bench" / "tools" / "precision.py"
)
precision = sys.modules.setdefault("bench_precision", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(precision)

pytestmark = pytest.mark.usefixtures("one_thread")

LOW = [torch.bfloat16, torch.float16]
# (method, exact mode) pairs: shadow for every optimizer, virtual for LOZO / LOZO-M.
EXACT = [
    ("mezo", "shadow"),
    ("lozo", "shadow"),
    ("lozo", "virtual"),
    ("lozo-m", "shadow"),
    ("lozo-m", "virtual"),
]


class Gate(torch.nn.Module):
    """A custom layer owning a vector (shadow swaps a temporary in while its forward runs) that
    can raise in the middle of its forward."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.boom: BaseException | None = None

    def forward(self, x):
        out = x * self.weight
        if self.boom is not None:
            raise self.boom
        return out


class Tiny(torch.nn.Module):
    """Embedding, Linear with bias, LayerNorm, a custom layer, Linear without bias."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 32)
        self.lin = torch.nn.Linear(32, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.gate = Gate(32)
        self.head = torch.nn.Linear(32, 4, bias=False)

    def forward(self, ids):
        h = self.norm(torch.relu(self.lin(self.emb(ids))))
        return self.head(self.gate(h)).float().pow(2).mean(dim=1)


def tiny(dtype, mode):
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.1, 0.1)
    model.to(dtype)
    if mode == "virtual":  # 1-D tensors run in place in virtual mode: freeze them
        for p in model.parameters():
            if p.ndim < 2:
                p.requires_grad_(False)
    ids = torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(1))
    return model, ids


def stored(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_equal(model, before, what):
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{what}: {name} changed"


def build(method, model, mode, lr=1e-3, seed=3):
    opt = precision.make_optimizer(method, model, lr, mode=mode, seed=seed, nu=7)
    assert opt.mode == mode and opt.exact, (opt.mode, opt.exact)
    assert opt.rounding == "stochastic"  # the default for bf16 / fp16
    return opt


def small(dtype, mode):
    """An Embedding (shadow: rows added to its output) and a Linear with bias (a temporary)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16)).to(dtype)
    if mode == "virtual":
        model[1].bias.requires_grad_(False)
    ids = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(1))
    return model, ids


def run_lr_zero(method, mode, dtype, make, steps=1000):
    model, ids = make(dtype, mode)
    before = stored(model)
    opt = build(method, model, mode)
    precision.zero_lr(opt)
    for _ in range(steps):
        opt.step(lambda: model(ids).float().pow(2).mean())
    assert_equal(model, before, f"{method} {mode} after {steps} steps at lr = 0")
    opt.detach()
    assert_equal(model, before, f"{method} {mode} after detach")


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("method,mode", EXACT, ids=[f"{m}-{x}" for m, x in EXACT])
def test_lr_zero_keeps_weights_bit_equal(method, mode, dtype):
    run_lr_zero(method, mode, dtype, small)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("method,mode", EXACT, ids=[f"{m}-{x}" for m, x in EXACT])
def test_lr_zero_keeps_weights_bit_equal_every_layer_kind(method, mode, dtype):
    run_lr_zero(method, mode, dtype, tiny)


def plain_output(dtype, weights, ids):
    """What a hook-free Tiny holding `weights` computes."""
    model = Tiny().to(dtype)
    model.load_state_dict(weights)
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("method", precision.METHODS)
def test_forwards_between_steps_see_the_stored_weights(method):
    """Shadow mode: outside a step (evaluation, a second model call) the hooks add nothing."""
    model, ids = tiny(torch.bfloat16, "shadow")
    opt = build(method, model, "shadow")
    for _ in range(2):
        opt.step(lambda: model(ids).mean())
    with torch.no_grad():
        assert torch.equal(model(ids), plain_output(torch.bfloat16, stored(model), ids))
    opt.detach()


FAILURES = ["exception", "interrupt", "nan"]


@pytest.mark.parametrize("at", [1, 2], ids=["first-eval", "second-eval"])
@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("method,mode", EXACT, ids=[f"{m}-{x}" for m, x in EXACT])
def test_failing_step_leaves_weights_bit_equal(method, mode, dtype, failure, at):
    model, ids = tiny(dtype, mode)
    opt = build(method, model, mode)
    for _ in range(3):  # momentum, pending virtual updates and a V epoch under way
        opt.step(lambda: model(ids).mean())
    before = stored(model)
    with torch.no_grad():  # virtual: the hooks apply the pending updates A·Vᵀ
        output = model(ids) if mode == "virtual" else plain_output(dtype, before, ids)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == at:
            if failure == "nan":
                return model(ids).mean() * float("nan")
            boom = RuntimeError("boom") if failure == "exception" else KeyboardInterrupt()
            model.gate.boom = boom
            try:
                return model(ids).mean()  # raises inside the forward: a temporary is swapped in
            finally:
                model.gate.boom = None
        return model(ids).mean()

    expected = {"exception": RuntimeError, "interrupt": KeyboardInterrupt}
    with pytest.raises(expected.get(failure, FloatingPointError)):
        opt.step(closure)
    assert len(calls) == at
    assert_equal(model, before, f"{method} {mode}: {failure} at evaluation {at}")
    with torch.no_grad():
        assert torch.equal(model(ids), output), "the model computes something else"
    opt.step(lambda: model(ids).mean())  # the optimizer carries on
    opt.detach()


TEACHER_SMALL = precision.TeacherConfig(size=128, inputs=1, shift=0.01, lr=1e-4, steps=1000)


_FP32 = {}


def _of_fp32(method, cfg, dtype="bfloat16", mode=None, rounding=None):
    key = (method, dataclasses.astuple(cfg))
    if key not in _FP32:
        _FP32[key] = precision.teacher_run(method, "float32", cfg=cfg)
    fp32 = _FP32[key]
    low = precision.teacher_run(method, dtype, mode, rounding, cfg=cfg)
    assert fp32["mode"] == "inplace" and fp32["start"] == low["start"]
    assert fp32["final"] < 0.75 * fp32["start"], fp32  # the float32 run makes clear progress
    return low["reduction"] / fp32["reduction"], low


@pytest.mark.parametrize("method", precision.METHODS)
def test_teacher_bf16_default_tracks_fp32(method):
    """128×128 (about 3 s per optimizer): bf16 defaults reach ≥ 90 % of fp32's reduction (98–101 %
    measured); in place with round-to-nearest reaches 72–81 % here."""
    ratio, low = _of_fp32(method, TEACHER_SMALL)
    assert low["mode"] in ("shadow", "virtual") and low["exact"], low
    assert ratio >= 0.9, (ratio, low)


def test_teacher_inplace_nearest_falls_short():
    """The check above can fail: bf16 in place with round-to-nearest does (LOZO: 80 %)."""
    ratio, low = _of_fp32("lozo", TEACHER_SMALL, mode="inplace", rounding="nearest")
    assert ratio < 0.9, (ratio, low)


@pytest.mark.slow
@pytest.mark.parametrize("method", precision.METHODS)
def test_teacher_bf16_default_tracks_fp32_bench_size(method):
    """bench/tools/precision.py teacher's own setting (256×256, 1,500 steps; 96–97 % measured)."""
    ratio, low = _of_fp32(method, precision.TeacherConfig())
    assert ratio >= 0.9, (ratio, low)


@pytest.mark.slow
def test_teacher_64_inputs_mezo_needs_accumulate():
    """The 64-input teacher (256×256, 1,500 steps), where one stochastic rounding per step adds
    more noise than MeZO's bf16 updates carry: the default (accumulate = 64, one rounding per 64
    steps; 93 % measured) reaches ≥ 90 % of fp32's reduction, accumulate = 1 does not (63 %)."""
    cfg = precision.TeacherConfig(inputs=64)  # (1,500 steps take off ~1 % of the loss)
    fp32 = precision.teacher_run("mezo", "float32", cfg=cfg)
    low = precision.teacher_run("mezo", "bfloat16", cfg=cfg)
    assert fp32["reduction"] > 0 and low["mode"] == "shadow", (fp32, low)
    assert low["reduction"] / fp32["reduction"] >= 0.9, (fp32, low)
    each = precision.teacher_run("mezo", "bfloat16", cfg=cfg, accumulate=1)
    assert each["reduction"] / fp32["reduction"] < 0.8, (fp32, each)
