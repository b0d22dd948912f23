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
    got = ways(tiny_opt_lm(), rank)
    assert got["model.decoder.embed_tokens.weight"] == ["rows", "product"]  # tied to the head
    # (OPT's positions are a subclass of nn.Embedding: not a stock one, so not "rows")
    rest = {k: v for k, v in got.items() if "embed_tokens" not in k}
    assert rest and all(v == ["preset"] for v in rest.values()), rest


@pytest.mark.parametrize("rank, matrix_way", [(0, "temporary"), (2, "product")])
def test_a_large_model_keeps_its_hooks(rank, matrix_way, monkeypatch):
    monkeypatch.setattr(shadow_part, "PRESET_ALL_NUMEL", 100)
    monkeypatch.setattr(shadow_part, "PRESET_MAX_NUMEL", 16)  # the tiny model's biases, norms
    got = ways(tiny_opt_lm(), rank)
    assert got["model.decoder.layers.0.fc1.weight"] == [matrix_way]
    presets = [k for k, v in got.items() if v == ["preset"]]
    assert presets and all(k.endswith(".bias") or "norm" in k for k in presets)


def train(method: str, all_presets: bool, monkeypatch, dtype=torch.bfloat16, steps=6):
    monkeypatch.setattr(shadow_part, "PRESET_ALL_NUMEL", 1 << 25 if all_presets else 0)
    model = tiny_opt_lm().to(dtype)
    cls, kwargs = (LOZO, {"rank": 2, "nu": 4}) if method == "lozo" else (MeZO, {})
    opt = cls(model, lr=1e-2, eps=1e-2, seed=3, mode="shadow", **kwargs)
    ids = torch.randint(3, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    losses = [opt.step(lambda: model(input_ids=ids, labels=ids).loss) for _ in range(steps)]
    return model, losses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_full_rank_presets_are_the_temporaries_bit_for_bit(dtype, monkeypatch):
    """MeZO: a preset's W + c·Z is the temporary's, so the run is the hooked one bit for bit."""
    model, losses = train("mezo", True, monkeypatch, dtype)
    ref, ref_losses = train("mezo", False, monkeypatch, dtype)
    assert [float(x) for x in losses] == [float(x) for x in ref_losses]
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_low_rank_presets_match_the_products(monkeypatch):
    """LOZO: a preset rounds W + c·U·Vᵀ to the weights' dtype where a product adds c·(x·V)·Uᵀ to
    the output: the same losses within that rounding."""
    _, losses = train("lozo", True, monkeypatch, torch.float32)
    _, ref_losses = train("lozo", False, monkeypatch, torch.float32)
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
