"""zofast.optim.shadow.plan_ways: how an optimizer's shadow tensors reach the forward, by the
model's size (a small model on one device: every hooked tensor a preset)."""

from __future__ import annotations

import pytest
import torch
from helpers_models import tiny_opt_lm

import zofast.optim.shadow as shadow_part
from zofast.optim import LOZO, MeZO
from zofast.optim.shadow import plan_ways
from zofast.shadow import ShadowTensor


def ways(model, rank: int) -> dict[str, list[str]]:
    tensors = [
        ShadowTensor(i, n, p, rank if p.dim() == 2 else 0)
        for i, (n, p) in enumerate(model.named_parameters())
    ]
    plan_ways(model, tensors)
    return {st.name: [u.way for u in st.uses] for st in tensors}


@pytest.mark.parametrize("rank", [0, 2])
def test_a_small_model_takes_presets(rank):
    """Every tensor, the embedding tied to the head too: the forward runs no hook."""
    got = ways(tiny_opt_lm(), rank)
    assert all(v == ["preset"] for v in got.values()), got


@pytest.mark.parametrize("rank, matrix_way", [(0, "temporary"), (2, "product")])
def test_a_large_model_keeps_its_hooks(rank, matrix_way, monkeypatch):
    monkeypatch.setattr(shadow_part, "PRESET_ALL_NUMEL", 100)
    monkeypatch.setattr(shadow_part, "PRESET_MAX_NUMEL", 16)  # the tiny model's biases, norms
    got = ways(tiny_opt_lm(), rank)
    assert got["model.decoder.layers.0.fc1.weight"] == [matrix_way]
    presets = [k for k, v in got.items() if v == ["preset"]]
    assert presets and all(k.endswith(".bias") or "norm" in k for k in presets)


def train(method: str, all_presets: bool, monkeypatch, dtype=torch.bfloat16, steps=6, make=None):
    monkeypatch.setattr(shadow_part, "PRESET_ALL_NUMEL", 1 << 25 if all_presets else 0)
    if make is None:
        model = tiny_opt_lm().to(dtype).eval()
        ids = torch.randint(3, 50, (3, 9), generator=torch.Generator().manual_seed(0))

        def closure():
            return model(input_ids=ids, labels=ids).loss
    else:
        model = make().to(dtype)
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)).to(dtype)

        def closure():
            return model(x).float().pow(2).mean()

    cls, kwargs = (LOZO, {"rank": 2, "nu": 4}) if method == "lozo" else (MeZO, {})
    opt = cls(model, lr=1e-2, eps=1e-2, seed=3, mode="shadow", **kwargs)
    losses = [opt.step(closure) for _ in range(steps)]
    return model, losses


def layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_full_rank_presets_are_the_temporaries_bit_for_bit(dtype, monkeypatch):
    """MeZO on Linear and norm layers: a preset's W + c·Z is the temporary's, so the run is the
    hooked one bit for bit."""
    model, losses = train("mezo", True, monkeypatch, dtype, make=layers)
    ref, ref_losses = train("mezo", False, monkeypatch, dtype, make=layers)
    assert [float(x) for x in losses] == [float(x) for x in ref_losses]
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("method", ["lozo", "mezo"])
def test_presets_match_the_rows_and_products(method, monkeypatch):
    """A preset rounds W + c·Z to the weights' dtype where the embedding's rows and the tied
    head's product add c·Z's part to the output: the same losses within that rounding."""
    _, losses = train(method, True, monkeypatch, torch.float32)
    _, ref_losses = train(method, False, monkeypatch, torch.float32)
    assert losses == pytest.approx(ref_losses, rel=1e-5)


def test_a_failing_step_leaves_the_weights(monkeypatch):
    """A NaN second loss with every tensor a preset: nothing written, no copy left swapped in."""
    monkeypatch.setattr(shadow_part, "PRESET_ALL_NUMEL", 1 << 25)
    model = tiny_opt_lm().to(torch.bfloat16)
    opt = MeZO(model, lr=1e-2, eps=1e-2, seed=3, mode="shadow")
    ids = torch.randint(3, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = {n: p.data_ptr() for n, p in model.named_parameters()}
    calls = []

    def nan_second():
        calls.append(1)
        loss = model(input_ids=ids, labels=ids).loss
        return loss * float("nan") if len(calls) == 2 else loss

    with pytest.raises(FloatingPointError):
        opt.step(nan_second)
    for n, p in model.named_parameters():
        assert p.data_ptr() == data[n], n
        assert torch.equal(p, before[n]), n


def test_a_compiled_forward_sees_the_presets(monkeypatch):
    """torch.compile of a small model in shadow mode: inside a step the compiled forward computes
    the eager one's loss at W ± ε·Z (float32, to its rounding), not the stored W's, the stored
    weights stay as they were until written, and then the compiled forward reads them."""
    monkeypatch.setattr(shadow_part, "PRESET_ALL_NUMEL", 1 << 25)
    model = tiny_opt_lm().eval()  # (no dropout)
    compiled = torch.compile(model.model, dynamic=True)
    ids = torch.randint(3, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]

    def loss(base):
        hidden = base(input_ids=ids).last_hidden_state
        return model.lm_head(hidden).float().logsumexp(-1).mean()

    with torch.no_grad():
        plain = loss(model.model)
    seen = []

    def closure():
        eager, fast = loss(model.model), loss(compiled)
        seen.append((float(eager), float(fast)))
        return fast

    opt = MeZO(model, lr=1e-2, eps=0.1, seed=3, mode="shadow", accumulate=2)
    for _ in range(1):  # the update is deferred to the second step's write
        opt.step(closure)
    assert len(seen) == 2
    for eager, fast in seen:
        assert fast == pytest.approx(eager, rel=2e-6)
        assert abs(eager - float(plain)) > 1e-4  # the perturbation is seen (≫ 2e-6 · 3.9)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    opt.step(closure)  # written: the compiled forward reads the new stored weights
    with torch.no_grad():
        assert float(loss(compiled)) == pytest.approx(float(loss(model.model)), rel=1e-5)
        assert float(loss(model.model)) != float(plain)
