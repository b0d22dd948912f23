"""Tests of zofast.shadow: the layers compute with W + c·Z while the stored weights stay untouched.

CPU, tiny models. References: a copy of the model perturbed in place by the engine (the
"temporary" way must equal it bit for bit), and a float64 copy with W + c·Z computed in float64
(the "rows" / "product" ways must be as close to it as the in-place copy is, ×2)."""

from __future__ import annotations

import pytest
import torch
from helpers_models import tiny_gpt2_lm, tiny_opt_lm
from transformers.pytorch_utils import Conv1D

import zofast.shadow as shadow
import zofast.virtual
from zofast.perturb import gaussian_, gaussian_noise, lowrank_, lowrank_factors
from zofast.shadow import ShadowLayers, ShadowTensor, plan

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

VOCAB, DIM, EPS = 37, 12, 1e-2


class TinyLM(torch.nn.Module):
    """Embedding tied to an LM head, Linear, LayerNorm, MultiheadAttention, and a parameter the
    root module owns (its temporary lives for the whole forward)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.fc = torch.nn.Linear(DIM, DIM)
        self.norm = torch.nn.LayerNorm(DIM)
        self.attn = torch.nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        self.scale = torch.nn.Parameter(torch.ones(DIM))

    def get_input_embeddings(self):
        return self.emb

    def forward(self, ids):
        h = self.emb(ids)
        h = h + torch.tanh(self.fc(h))
        h = self.norm(h) * self.scale
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h + a)


def randomised(model, dtype=torch.float32, device="cpu"):
    """Weights N(0, 0.3²) from a fixed generator (same values for every call), in `dtype`."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.to(device=device, dtype=dtype).eval()


def tiny(dtype=torch.float32, device="cpu"):
    return randomised(TinyLM(), dtype, device)


def gpt2(dtype=torch.float32, device="cpu"):
    return randomised(tiny_gpt2_lm(), dtype, device)


def opt_model(dtype=torch.float32, device="cpu"):
    return randomised(tiny_opt_lm(), dtype, device)


def ids_for(vocab, shape=(3, 7), device="cpu"):
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
    return ids.to(device)


def run(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def shadow_tensors(model, rank=2, names=None, seed=1000):
    """A ShadowTensor per (named, deduplicated) parameter, with a direction set: low-rank of
    `rank` for matrices (0: full-rank for all), full-rank for vectors."""
    tensors = []
    for i, (name, p) in enumerate(model.named_parameters()):
        if names is not None and name not in names:
            continue
        st = ShadowTensor(i, name, p, rank if p.dim() >= 2 else 0)
        base = seed + 2 * i
        st.set_direction(0, (base, base + 1) if st.rank else (base,))
        tensors.append(st)
    return tensors


def attached(model, tensors, **kwargs):
    layers = ShadowLayers(plan(model, tensors, **kwargs))
    layers.attach()
    return layers


def set_coef(tensors, c):
    for st in tensors:
        st.set_coef(c)


def noise(st, dtype=torch.float64):
    """Z of a tensor, materialised (the engine's contract)."""
    p = st.param
    if st.rank:
        U, V = lowrank_factors(p.shape, *st.seeds, st.rank, device=p.device)
        return (U.to(dtype) @ V.to(dtype).T).reshape(p.shape)
    return gaussian_noise(p.shape, st.seeds[0], device=p.device).to(dtype)


def perturbed_copy(make, dtype, tensors, c):
    """A fresh model of `dtype` whose trained weights are W + c·Z: by the engine in place, or
    in float64 arithmetic for dtype float64 (W then being the float64 of the `lowp` weights)."""
    model = make(tensors[0].param.dtype, tensors[0].param.device).to(dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for st in tensors:
            p = params[st.name]
            if dtype == torch.float64:
                p.add_(noise(st), alpha=c)
            elif st.rank:
                lowrank_(p.data, *st.seeds, st.rank, c)
            else:
                gaussian_(p.data, st.seeds[0], c)
    return model


def snapshot(model):
    return {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}


def unchanged(model, snap):
    return all(
        torch.equal(p, snap[n][0]) and p.data_ptr() == snap[n][1]
        for n, p in model.named_parameters()
    )


def plain(model):
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_always_called)
        and m not in zofast.virtual._OWNERS
        for m in model.modules()
    )


def max_err(a, ref):
    return (a.double() - ref).abs().max().item()


# What plan chooses.


def test_plan_ways():
    model = tiny()
    tensors = plan(model, shadow_tensors(model))
    ways = {st.name: [(type(u.module).__name__, u.way) for u in st.uses] for st in tensors}
    assert ways["emb.weight"] == [("Embedding", "rows"), ("Linear", "product")]  # tied head
    assert ways["fc.weight"] == [("Linear", "temporary")]
    assert ways["norm.bias"] == [("LayerNorm", "temporary")]
    assert ways["scale"] == [("TinyLM", "temporary")]  # owned by the root
    for name in ("attn.in_proj_weight", "attn.out_proj.weight", "attn.out_proj.bias"):
        assert ways[name] == [("MultiheadAttention", "temporary")]  # it reads its children
    big = {st.name: st.uses for st in plan(model, tensors, product_min_numel=DIM * DIM)}
    assert [u.way for u in big["fc.weight"]] == ["product"]
    assert [u.way for u in big["fc.bias"]] == ["temporary"]
    assert [u.way for u in big["attn.out_proj.weight"]] == ["temporary"]


def test_plan_gpt2_and_opt():
    ways = {}
    for make in (gpt2, opt_model):
        model = make()
        for st in plan(model, shadow_tensors(model)):
            ways[st.name] = [(u.way, u.kind) for u in st.uses]
    assert ways["transformer.wte.weight"] == [("rows", "embedding"), ("product", "linear")]
    assert ways["transformer.wpe.weight"] == [("rows", "embedding")]
    assert ways["transformer.h.0.attn.c_attn.weight"] == [("temporary", None)]
    # OPT's learned positional embedding overrides forward: a temporary
    assert ways["model.decoder.embed_positions.weight"] == [("temporary", None)]
    assert ways["model.decoder.embed_tokens.weight"] == [
        ("rows", "embedding"),
        ("product", "linear"),
    ]


def test_parameter_owned_by_no_module_is_refused():
    model = tiny()
    free = ShadowTensor(99, "free_vector", torch.nn.Parameter(torch.zeros(5)))
    with pytest.raises(ValueError, match="free_vector"):
        plan(model, [*shadow_tensors(model), free])
    with pytest.raises(ValueError, match="same parameter"):
        plan(model, [ShadowTensor(0, "a", model.fc.bias), ShadowTensor(1, "b", model.fc.bias)])


def test_bad_arguments():
    w = torch.nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="rank"):
        ShadowTensor(0, "w", w, rank=4)
    with pytest.raises(TypeError, match="w"):
        ShadowTensor(0, "w", torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64)))
    st = ShadowTensor(0, "w", w, rank=2)
    with pytest.raises(ValueError, match="set_direction"):
        st.set_coef(EPS)
    with pytest.raises(ValueError, match="u_seed, v_seed"):
        st.set_direction(0, (1,))
    with pytest.raises(ValueError, match="no uses"):
        ShadowLayers([st]).attach()


# The temporary way: bit for bit the in-place perturbed copy.

TEMPORARY_ONLY = [
    "scale",
    "fc.weight",
    "fc.bias",
    "norm.weight",
    "norm.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("device", DEVICES)
def test_temporaries_equal_inplace_bit_for_bit(dtype, rank, context, device, fresh_seed):
    model = tiny(dtype, device)
    snap = snapshot(model)
    tensors = shadow_tensors(model, rank, TEMPORARY_ONLY, seed=fresh_seed)
    layers = attached(model, tensors)
    ids = ids_for(VOCAB, device=device)
    grad_context = torch.no_grad if context == "no_grad" else torch.inference_mode
    for c in (EPS, -EPS, 0.0, EPS):
        with grad_context():
            set_coef(tensors, c)
            got = run(model, ids)
            want = run(perturbed_copy(tiny, dtype, tensors, c), ids)
        assert torch.equal(got, want), (c, fresh_seed)
        assert not layers.swapped and unchanged(model, snap)
    assert {st.name for st in layers.used()} == set(TEMPORARY_ONLY)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_bulk_equals_per_tensor_bit_for_bit(dtype, device):
    """ShadowLayers.set_direction / set_coef (factors made for all tensors at once, presets
    perturbed in one pass: one launch each on a GPU) give the forwards of per-tensor
    set_direction / set_coef (factors per tensor, temporaries), bit for bit, and leave the
    stored weights as they were."""
    ids = ids_for(VOCAB, device=device)
    outputs = []
    for bulk in (False, True):
        model = tiny(dtype, device)
        snap = snapshot(model)
        tensors = shadow_tensors(model, 2)
        presets = 10**6 if bulk else None
        layers = attached(model, tensors, product_min_numel=0, preset_max_numel=presets)
        ways = {u.way for st in tensors for u in st.uses}
        assert ways == ({"rows", "product", "preset"} if bulk else {"rows", "product", "temporary"})
        got = []
        with torch.no_grad():
            for c in (EPS, -EPS, 0.0):
                if bulk:
                    layers.set_direction(0, [st.seeds for st in tensors])
                    layers.set_coef(c)
                else:
                    set_coef(tensors, c)
                got.append(run(model, ids))
        assert not layers.swapped and unchanged(model, snap)
        layers.remove_hooks()
        outputs.append(got)
    for per_tensor, bulk in zip(*outputs, strict=True):
        assert torch.equal(per_tensor, bulk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bulk_factors_under_the_interpreter(dtype, monkeypatch):
    """StepFactors' multi-tensor launch (the GPU's way, here under Triton's interpreter) hands
    every product / rows tensor lowrank_factors' (U, V) on the same backend, bit for bit, in
    the layout that factors made per tensor have."""
    from zofast import shadow_step

    monkeypatch.setattr(shadow_step, "bulk_on", lambda device: True)
    model = tiny(dtype)
    tensors = shadow_tensors(model, 2)
    layers = attached(model, tensors, product_min_numel=0)
    layers.set_direction(0, [st.seeds for st in tensors])
    checked = 0
    for st in tensors:
        if st.rank and {u.way for u in st.uses} & {"rows", "product"}:
            U, V = lowrank_factors(st.param.shape, *st.seeds, st.rank, backend="triton")
            for got, want in zip(st._factors, (U, V), strict=True):
                want = shadow_step.transposed(want, dtype)
                assert torch.equal(got, want) and got.stride() == want.stride(), st.name
            checked += 1
    assert checked == 2  # the tied embedding / head, fc
    layers.remove_hooks()


def test_transformers_temporaries_bit_for_bit():
    """GPT-2 (Conv1D, LayerNorm) and OPT (its positional embedding, projections): every weight
    but the tied embedding takes a temporary."""
    for make in (gpt2, opt_model):
        model = make()
        names = [n for n, _ in model.named_parameters() if "embed_tokens" not in n]
        names = [n for n in names if "wte" not in n and "wpe" not in n]
        tensors = shadow_tensors(model, 2, names)
        attached(model, tensors)
        ids = ids_for(50)
        with torch.no_grad():
            for c in (EPS, -EPS):
                set_coef(tensors, c)
                want = run(perturbed_copy(make, torch.float32, tensors, c), ids)
                assert torch.equal(run(model, ids), want)


# Rows and products: against float64.


@pytest.mark.parametrize("make", [tiny, gpt2, opt_model], ids=["tiny", "gpt2", "opt"])
@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("product_min_numel", [None, 0])
@pytest.mark.parametrize("device", DEVICES)
def test_every_way_against_float64(make, rank, product_min_numel, device):
    """All parameters trained: the shadow forward is within 2× the in-place float32 copy's
    error of the float64 model with W + c·Z, and so is the finite difference y(+ε) − y(−ε)."""
    model = make(device=device)
    snap = snapshot(model)
    tensors = shadow_tensors(model, rank)
    layers = attached(model, tensors, product_min_numel=product_min_numel)
    ids = ids_for(model.get_input_embeddings().num_embeddings, device=device)
    got, want, inplace = {}, {}, {}
    with torch.no_grad():
        for c in (EPS, -EPS):
            set_coef(tensors, c)
            got[c] = run(model, ids).double()
            want[c] = run(perturbed_copy(make, torch.float64, tensors, c), ids)
            inplace[c] = run(perturbed_copy(make, torch.float32, tensors, c), ids).double()
            assert max_err(got[c], want[c]) <= 2 * max_err(inplace[c], want[c])
    diff, diff_want = got[EPS] - got[-EPS], want[EPS] - want[-EPS]
    assert max_err(diff, diff_want) <= 2 * max_err(inplace[EPS] - inplace[-EPS], diff_want)
    assert max_err(diff, diff_want) < 1e-4 * diff_want.abs().max().item()
    assert unchanged(model, snap)
    assert len(layers.used()) == len(tensors)


class TiedPair(torch.nn.Module):
    """An embedding and a layer tied to it: a Linear head, or a GPT-2 Conv1D (W: in × out)."""

    def __init__(self, head="linear"):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        if head == "linear":
            self.head = torch.nn.Linear(DIM, VOCAB, bias=False)
        else:
            self.head = Conv1D(DIM, VOCAB)  # weight (VOCAB, DIM): y = x·W + b
        self.head.weight = self.emb.weight

    def forward(self, ids, x):
        return self.emb(ids), self.head(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("head", ["linear", "conv1d"])
@pytest.mark.parametrize("chunk", [None, 5 * DIM + 3])
@pytest.mark.parametrize("device", DEVICES)
def test_rows_and_product_per_layer(dtype, rank, head, chunk, device, monkeypatch):
    """Embedding rows: y = W[ids] + c·Z[ids] within the rounding of that sum, 2·eps·(|W| +
    |c|·|Z|) (|Z| bounded by |U|·|V|ᵀ when low-rank) against float64; the tied layer within 2×
    the error of the in-place copy in the same dtype. `chunk`: Z generated 5 rows at a time
    (ragged last chunk) instead of at once."""
    if chunk is not None:
        monkeypatch.setattr(shadow, "CHUNK_NUMEL", chunk)

    def make(dtype, device):
        return randomised(TiedPair(head), dtype, device)

    model = make(dtype, device)
    (st,) = tensors = shadow_tensors(model, rank, ["emb.weight"])
    assert [u.way for u in plan(model, tensors)[0].uses] == ["rows", "product"]
    attached(model, tensors)
    ids = ids_for(VOCAB, (4, 9), device)
    features = DIM if head == "linear" else VOCAB
    x = torch.randn(4, 9, features, generator=torch.Generator().manual_seed(2))
    x = x.to(device=device, dtype=dtype)
    if rank:
        U, V = lowrank_factors(st.param.shape, *st.seeds, rank, device=device)
        size = U.double().abs() @ V.double().abs().T
    else:
        size = noise(st).abs()
    with torch.no_grad():
        for c in (EPS, -EPS):
            set_coef(tensors, c)
            rows, out = model(ids, x)
            rows_want, out_want = perturbed_copy(make, torch.float64, tensors, c)(ids, x.double())
            _, out_inplace = perturbed_copy(make, dtype, tensors, c)(ids, x)
            bound = st.param.double().abs() + abs(c) * size
            bound = 2 * torch.finfo(dtype).eps * bound[ids]
            assert ((rows.double() - rows_want).abs() <= bound).all()
            assert max_err(out, out_want) <= 2 * max_err(out_inplace, out_want)
            assert not torch.equal(rows, st.param[ids])  # it was perturbed


# c = 0, stored weights, usage.


@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_zero_coefficient_does_nothing(rank, device, monkeypatch):
    """c = 0: bit-identical to the unhooked model, and no noise is generated, no temporary
    built (the engine's entry points raise if called)."""
    model = tiny(device=device)
    ids = ids_for(VOCAB, device=device)
    contexts = (torch.no_grad, torch.inference_mode, torch.enable_grad)
    want = []
    for context in contexts:  # with grad, MultiheadAttention leaves its fast path
        with context():
            want.append(run(model, ids))
    tensors = shadow_tensors(model, rank)
    layers = attached(model, tensors)

    def forbidden(*args, **kwargs):
        raise AssertionError("called with c = 0")

    for name in ("_build_temporary", "_noise_rows", "_add_rows", "_add_product", "_add_lowrank"):
        monkeypatch.setattr(shadow, name, forbidden)
    monkeypatch.setattr(ShadowTensor, "factors", forbidden)
    set_coef(tensors, EPS)
    set_coef(tensors, 0.0)
    for context, expected in zip(contexts, want, strict=True):
        with context():
            assert torch.equal(run(model, ids), expected)
    assert layers.used() == []


def test_stored_weights_untouched_over_many_forwards():
    model = tiny(torch.bfloat16)
    snap = snapshot(model)
    tensors = shadow_tensors(model, 2)
    attached(model, tensors)
    ids = ids_for(VOCAB)
    with torch.no_grad():
        for step in range(4):
            for st in tensors:
                st.set_direction(step, (7 * step + st.index, 99) if st.rank else (step,))
            for c in (EPS, -EPS, 0.0):
                set_coef(tensors, c)
                run(model, ids)
                assert unchanged(model, snap)


def test_one_module_s_temporaries_at_a_time():
    """While a layer runs, the swapped-in tensors are its own and its owners' (the root's
    `scale`): the memory bound of the temporary way."""
    model = tiny(torch.bfloat16)
    tensors = shadow_tensors(model, 2)
    attached(model, tensors)
    seen = {}

    def recorder(name):
        def record(module, args):
            seen[name] = sorted(st.name for st in tensors if st.swapped)

        return record

    for name, module in model.named_children():
        module.register_forward_pre_hook(recorder(name))  # after the shadow pre-hook
    with torch.no_grad():
        set_coef(tensors, EPS)
        run(model, ids_for(VOCAB))
    assert seen == {
        "emb": ["scale"],
        "fc": ["fc.bias", "fc.weight", "scale"],
        "norm": ["norm.bias", "norm.weight", "scale"],
        "head": ["scale"],  # tied to the embedding: a product, nothing swapped
        "attn": [
            "attn.in_proj_bias",
            "attn.in_proj_weight",
            "attn.out_proj.bias",
            "attn.out_proj.weight",
            "scale",
        ],
    }
    assert not any(st.swapped for st in tensors)


def test_usage_records_only_tensors_a_forward_perturbed():
    """A parent reading a child's weight directly bypasses the child's hooks: the record
    shows that the tensor was not applied."""

    class Reader(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.read = torch.nn.Linear(4, 4)
            self.called = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.called(x @ self.read.weight.T)

    model = Reader()
    tensors = shadow_tensors(model, 0)
    layers = attached(model, tensors)
    with torch.no_grad():
        set_coef(tensors, EPS)
        model(torch.ones(2, 4))
    assert {st.name for st in layers.used()} == {"called.weight", "called.bias"}
    layers.reset_usage()
    assert layers.used() == []


# Tied and nested owners.


class Nested(torch.nn.Module):
    """Parameters registered by the root and by children it calls (applied once, by the root's
    temporary: a Linear's, and an embedding's tied to a head), and one shared by two sibling
    Linears (each applies it while it runs)."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(6, 6, bias=False)
        self.w = self.inner.weight
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.emb = torch.nn.Embedding(10, 6)
        self.head = torch.nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight
        self.table = self.emb.weight

    def forward(self, x):
        h = self.inner(x) + x @ self.w.T + self.emb(torch.arange(x.shape[0]))
        return self.head(self.b(torch.tanh(self.a(h)))) + self.table.sum()


def make_nested(dtype=torch.float32, device="cpu"):
    return randomised(Nested(), dtype, device)


@pytest.mark.parametrize("rank", [0, 2])
def test_tied_and_nested_owners_apply_once(rank):
    model = make_nested()
    tensors = shadow_tensors(model, rank)
    attached(model, tensors)
    uses = {st.name: [(type(u.module).__name__, u.way) for u in st.uses] for st in tensors}
    assert uses["w"] == [("Nested", "temporary"), ("Linear", "temporary")]
    assert uses["a.weight"] == [("Linear", "temporary")] * 2
    assert uses["table"] == [
        ("Nested", "temporary"),
        ("Embedding", "rows"),
        ("Linear", "product"),
    ]
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for c in (EPS, -EPS):
            set_coef(tensors, c)
            assert torch.equal(model(x), perturbed_copy(make_nested, torch.float32, tensors, c)(x))


# Exceptions.


class Boom(torch.nn.Linear):
    """A Linear whose forward raises `error` (if set) after computing with its weight."""

    error: type[BaseException] | None = None

    def forward(self, x):
        y = super().forward(x)
        if self.error is not None:
            raise self.error("boom")
        return y


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(4))
        self.boom = Boom(4, 4)

    def forward(self, x):
        return self.boom(x * self.scale)


def test_exception_in_forward_leaves_no_temporary():
    """An Exception: the always-called hooks put the stored tensors back (the child's and the
    root's). A KeyboardInterrupt skips them: restore() does it, and is idempotent."""
    model = randomised(Outer())
    snap = snapshot(model)
    tensors = shadow_tensors(model, 2)
    layers = attached(model, tensors)
    x = torch.ones(2, 4)
    with torch.no_grad():
        set_coef(tensors, EPS)
        want = model(x)
        model.boom.error = RuntimeError
        with pytest.raises(RuntimeError, match="boom"):
            model(x)
        assert not layers.swapped and unchanged(model, snap)
        model.boom.error = KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            model(x)
        assert layers.swapped and not unchanged(model, snap)
        with pytest.raises(RuntimeError, match="restore"):
            set_coef(tensors, -EPS)
        layers.restore()
        layers.restore()
        assert not layers.swapped and unchanged(model, snap)
        model.boom.error = None
        assert torch.equal(model(x), want)
        assert not layers.swapped


# Attaching, refusing, removing.


def test_second_optimizer_or_virtual_hooks_refused():
    model = tiny()
    first = attached(model, shadow_tensors(model))
    second = ShadowLayers(plan(model, shadow_tensors(model, names=["fc.bias"])))
    with pytest.raises(ValueError, match="already driven"):
        second.attach()
    first.attach()  # attaching again is a no-op
    found = zofast.virtual.plan(model, [model.fc.weight])[id(model.fc.weight)]
    vt = zofast.virtual.VirtualTensor(0, "fc.weight", model.fc.weight, 2, found)
    virtual = zofast.virtual.VirtualLayers([vt])
    with pytest.raises(ValueError, match="already driven"):
        virtual.attach()
    first.remove_hooks()
    virtual.attach()
    with pytest.raises(ValueError, match="shadow or virtual"):
        ShadowLayers(plan(model, shadow_tensors(model, names=["fc.bias"]))).attach()
    virtual.remove_hooks()
    second.attach()
    second.remove_hooks()
    assert plain(model)


@pytest.mark.parametrize("how", ["remove_hooks", "detach"])
def test_removing_leaves_a_plain_model(how):
    model = tiny()
    ids = ids_for(VOCAB)
    with torch.no_grad():
        want = run(model, ids)
    tensors = shadow_tensors(model)
    layers = attached(model, tensors)
    set_coef(tensors, EPS)
    with torch.no_grad():
        assert not torch.equal(run(model, ids), want)
    if how == "remove_hooks":
        layers.remove_hooks()
    else:
        shadow.detach(model)
    assert plain(model) and not layers.attached
    with torch.no_grad():
        assert torch.equal(run(model, ids), want)
