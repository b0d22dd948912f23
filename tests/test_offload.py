"""Streamed offload (zofast.offload): block weights on the host, copied to the compute device
block by block. On the CPU the compute device is the CPU itself: every swap, buffer ring and
copy still runs (a stand-in device), so the iterates must equal the plain run's bit for bit for
every optimizer and mode; the GPU test streams a tiny OPT from pinned host memory to cuda:0."""

from __future__ import annotations

import pytest
import torch
from helpers_models import optimizer, weights

from zofast import offload, offload_host, offload_update, paired, perturb

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6  # nu = 4: step 4 refreshes V (virtual mode's flush)
CASES = [
    ("lozo", "bfloat16", {}),
    ("lozo", "bfloat16", {"paired": True}),
    ("lozo", "bfloat16", {"mode": "shadow"}),
    ("lozo", "bfloat16", {"mode": "shadow", "paired": True}),
    ("lozo-m", "bfloat16", {}),
    ("lozo", "float32", {}),
    ("mezo", "bfloat16", {}),
    ("mezo", "float32", {"weight_decay": 0.1}),
]


def tiny(arch="opt", dtype="float32", layers=3):
    """A tiny transformers model from a config, seeded."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "opt":
        config = tf.OPTConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=layers, ffn_dim=64,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
        )  # fmt: skip
        model = tf.OPTForCausalLM(config)
    elif arch == "gpt2":
        config = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
        model = tf.GPT2LMHeadModel(config)
    elif arch == "llama":
        config = tf.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(config)
    else:
        config = tf.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64,
        )  # fmt: skip
        model = tf.BertForMaskedLM(config)
    return model.to(getattr(torch, dtype)).eval()


def batch(device="cpu"):
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train(model, method, options, device="cpu", steps=STEPS):
    opt = optimizer(method, model, options)
    data = batch(device)
    if options.get("paired"):
        closure = lambda: paired.losses(model, data)  # noqa: E731
    else:
        closure = lambda: model(**data).loss.float()  # noqa: E731
    for _ in range(steps):
        opt.step(closure)
    opt.detach()
    return opt


@pytest.mark.parametrize(("method", "dtype", "options"), CASES)
def test_streamed_blocks_train_bit_for_bit(method, dtype, options):
    plain_model = tiny(dtype=dtype)
    plain = train(plain_model, method, options)
    model = tiny(dtype=dtype)
    homes = {n: p.data_ptr() for n, p in model.named_parameters() if ".layers." in n}
    streamed = offload.stream(model, device="cpu")
    seen = []  # (block, its parameters' data are the home tensors) during its forward
    block = streamed.blocks[1][1]
    probe = block.register_forward_pre_hook(  # after the swap-in (registered later)
        lambda m, a: seen.append(any(p.data_ptr() == homes[n] for n, p in streamed_named(m)))
    )

    def streamed_named(m):
        return [(f"{streamed.blocks[1][0]}.{n}", p) for n, p in m.named_parameters()]

    opt = train(model, method, options)
    probe.remove()
    assert seen and not any(seen), "a block computed with its host tensors"
    assert streamed.uploads >= len(seen) * len(streamed.blocks)
    assert all(p.data_ptr() == homes[n] for n, p in model.named_parameters() if n in homes)
    assert opt.mode == plain.mode and opt.trajectory.to_dict() == plain.trajectory.to_dict()
    a, b = weights(model), weights(plain_model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    streamed.remove()


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("opt", "model.decoder.layers"),
        ("gpt2", "transformer.h"),
        ("llama", "model.layers"),
        ("bert", "bert.encoder.layer"),
    ],
)
def test_blocks_are_found_by_structure(arch, expected):
    model = tiny(arch, layers=2)
    names = [name for name, _ in offload.find_blocks(model)]
    assert names == [f"{expected}.0", f"{expected}.1"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_other_families_train_bit_for_bit(arch, prefetch):
    """LOZO's default (virtual, bf16) and paired steps on GPT-2 (Conv1D), Llama (RMSNorm,
    rotary buffers) and BERT (masked LM)."""
    for options in ({}, {"paired": True}):
        plain_model = tiny(arch, "bfloat16")
        train(plain_model, "lozo", options, steps=3)
        model = tiny(arch, "bfloat16")
        streamed = offload.stream(model, device="cpu", prefetch=prefetch)
        train(model, "lozo", options, steps=3)
        a, b = weights(model), weights(plain_model)
        assert all(torch.equal(a[n], b[n]) for n in a), (arch, options)
        streamed.remove()


@pytest.mark.parametrize(
    ("method", "dtype", "options"),
    [*CASES[1:5], CASES[7], ("lozo", "bfloat16", {"mode": "inplace"})],
)
def test_updates_on_the_device_are_written_back_bit_for_bit(method, dtype, options):
    """update="gpu" with the CPU standing in for the GPU: every pass over a block tensor runs on
    an uploaded copy and is written back; with the same engine there (C++) the weights end bit
    for bit the plain run's, in every mode (the host copy is never stale)."""
    plain_model = tiny(dtype=dtype)
    plain = train(plain_model, method, options, steps=5)
    model = tiny(dtype=dtype)
    streamed = offload.stream(model, device="cpu", update="gpu")
    opt = train(model, method, options, steps=5)
    assert streamed.writes.writes >= 5 * len(streamed.blocks)
    assert opt.trajectory.to_dict() == plain.trajectory.to_dict()
    a, b = weights(model), weights(plain_model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    streamed.remove()
    assert not perturb._WRITES_ELSEWHERE


@pytest.mark.parametrize(
    ("op", "dtype", "round_seed"),
    [
        ("lowrank", torch.bfloat16, 11),
        ("gaussian", torch.float32, None),
        ("outer", torch.bfloat16, 5),
    ],
)
def test_device_passes_equal_the_host_engine_within_one_ulp(op, dtype, round_seed):
    """The GPU's kernels (Triton, here its interpreter) against the host's C++ engine on one
    update pass: the stochastic rounding's words are the same on every backend, the normals'
    float32 bits are not (libm against libdevice; the interpreter's unfused fma), so a weight
    may differ by one ulp where its float32 value straddles a rounding boundary, rarely."""
    w = torch.randn(257, 129, generator=torch.Generator().manual_seed(0)).to(dtype)
    host = w.clone()
    stand_in = w.clone()
    writes = offload_update.DeviceWrites(torch.device("cpu"), backend="triton")
    writes.register([stand_in])
    left, right = torch.randn(257, 3) * 1e-2, torch.randn(129, 3)
    for t in (host, stand_in):
        kwargs = {"round_seed": round_seed, "w_scale": 0.999}
        if op == "lowrank":
            perturb.lowrank_(t, [1, 2], [3, 4], 2, [1e-2, -3e-3], **kwargs)
        elif op == "gaussian":
            perturb.gaussian_(t, [1, 1], [1e-2, -7.9e-3], **kwargs)
        else:
            perturb.outer_add_(t, left, right, **kwargs)
    writes.release()
    assert writes.writes == 1
    # One ulp of the result (a flip at a rounding boundary), plus float32 roundings of terms as
    # large as the weight and the update (a cancelling sum keeps their absolute error).
    gap = (host.float() - stand_in.float()).abs()
    operands = w.float().abs() + (host.float() - w.float()).abs().max()
    bound = (
        torch.finfo(dtype).eps * host.float().abs() + 4 * torch.finfo(torch.float32).eps * operands
    )
    assert (gap <= bound).all()
    assert (gap > 0).float().mean() < 0.01


def test_only_in_place_passes_over_block_tensors_are_sent_to_the_device():
    model = tiny()
    streamed = offload.stream(model, device="cpu", update="gpu")
    block_w = streamed.blocks[0][1].fc1.weight
    head = model.lm_head.weight
    perturb.gaussian_(block_w, 1, 1e-3)
    perturb.lowrank_(block_w, 2, 3, 2, 1e-3)
    assert streamed.writes.writes == 2
    perturb.gaussian_(head, 1, 1e-3)  # not a block tensor
    perturb.gaussian_(block_w, 1, 1e-3, out=torch.empty_like(block_w))  # a read
    assert streamed.writes.writes == 2
    streamed.remove()
    perturb.gaussian_(block_w, 1, 1e-3)
    assert streamed.writes.writes == 2


def test_pinned_blocks_share_one_registered_buffer(monkeypatch):
    """pin=True: the block tensors packed into one host buffer, registered once and unregistered
    on remove() (fakes for cudaHostRegister / cudaHostUnregister); a model whose blocks already
    are views of one storage is registered where it is."""
    calls = []
    monkeypatch.setattr(offload_host, "cuda_register", lambda ptr, n: calls.append(("on", ptr, n)))
    monkeypatch.setattr(offload_host, "cuda_unregister", lambda ptr: calls.append(("off", ptr)))
    model = tiny(dtype="bfloat16")
    before = weights(model)
    streamed = offload.stream(model, device="cpu", pin=True)
    held = [p for _, b in streamed.blocks for p in b.parameters()]
    buffer = streamed.host_buffer
    assert buffer.packed and calls == [("on", buffer.ptr, buffer.nbytes)]
    assert {p.untyped_storage().data_ptr() for p in held} == {buffer.ptr}
    assert all((p.data_ptr() - buffer.ptr) % offload_host.ALIGN == 0 for p in held)
    assert buffer.nbytes < sum(p.numel() * 2 for p in held) + len(held) * offload_host.ALIGN
    assert all(torch.equal(p, before[n]) for n, p in weights(model).items())
    ptr = buffer.ptr
    streamed.remove()
    streamed.remove()
    assert calls[1:] == [("off", ptr)]
    again = offload.stream(model, device="cpu", pin=True)
    assert not again.host_buffer.packed and again.host_buffer.ptr == ptr
    again.remove()


def test_without_cuda_pinning_is_refused_and_skipped_by_default():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    streamed = offload.stream(tiny(), device="cpu")
    assert streamed.host_buffer is None
    streamed.remove()
    with pytest.raises(RuntimeError, match="pin=False"):
        offload.stream(tiny(), device="cpu", pin=True)


def test_a_failing_forward_puts_the_host_tensors_back():
    model = tiny()
    streamed = offload.stream(model, device="cpu")
    homes = {id(p): p.data_ptr() for p in model.parameters()}
    boom = streamed.blocks[1][1].register_forward_pre_hook(lambda m, a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(input_ids=torch.ones(2, 5, dtype=torch.long))
    boom.remove()
    streamed.restore()
    assert all(p.data_ptr() == homes[id(p)] for p in model.parameters())
    out = model(input_ids=torch.ones(2, 5, dtype=torch.long)).logits
    assert torch.isfinite(out).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="prefetch"):
        offload.stream(tiny(), device="cpu", prefetch=0)
    with pytest.raises(ValueError, match="update"):
        offload.stream(tiny(), device="cpu", update="disk")
    with pytest.raises(ValueError, match="no repeated blocks"):
        offload.stream(torch.nn.Linear(2, 2), device="cpu")
    tied = tiny()
    tied.lm_head.weight = tied.model.decoder.layers[0].fc1.weight
    with pytest.raises(ValueError, match="tied"):
        offload.stream(tied, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"paired": True}])
def test_opt_streamed_to_a_gpu_trains_as_on_the_gpu(options):
    """A tiny OPT streamed from pinned host memory to cuda:0: the block weights stay on the
    host, the forwards run on the GPU, and the iterates equal the run on cuda:0 alone within
    the bf16 rounding of the forwards (the block's low-rank terms go through the per-tensor
    hook path on the GPU, the one-GPU run through the flat one) and of the updates (written by
    the host engine)."""
    start = weights(tiny(dtype="bfloat16"))
    one_model = tiny(dtype="bfloat16").cuda()
    one = train(one_model, "lozo", options, device="cuda")
    model = tiny(dtype="bfloat16")
    streamed = offload.stream(model, device="cuda")
    assert all(p.is_pinned() for _, b in streamed.blocks for p in b.parameters())
    assert model.lm_head.weight.is_cuda
    opt = train(model, "lozo", options, device="cuda")
    assert opt.trajectory.device == "cpu+cuda"
    g_s, g_one = (torch.tensor(list(t.trajectory._g)) for t in (opt, one))
    torch.testing.assert_close(g_s, g_one, rtol=0.05, atol=0.05 * float(g_one.abs().max()))
    moved, moved_one = weights(model), weights(one_model)
    for name, w in moved_one.items():
        step = (w.float() - start[name].float()).norm()
        gap = (moved[name].float() - w.float()).norm()
        assert gap <= 0.15 * step + 1e-6, (name, float(gap), float(step))
    streamed.remove()


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"paired": True}, {"mode": "shadow"}])
def test_updates_on_the_gpu_track_the_host_engines(options):
    """The same streamed run (registered pinned buffers) with the block tensors' passes on the
    host (C++) and on the GPU (Triton, written back): the same trajectory within the float32
    rounding of the normals, which differ across the two (one ulp where a weight's float32 value
    straddles a rounding boundary); the update="gpu" passes did run."""
    start, runs = weights(tiny(dtype="bfloat16")), []
    for update in ("host", "gpu"):
        model = tiny(dtype="bfloat16")
        streamed = offload.stream(model, device="cuda", update=update)
        assert streamed.host_buffer is not None and streamed.host_buffer.ptr is not None
        opt = train(model, "lozo", options, device="cuda")
        assert update == "host" or streamed.writes.writes >= STEPS * len(streamed.blocks)
        streamed.remove()
        runs.append((torch.tensor(list(opt.trajectory._g)), weights(model)))
    (g_host, host), (g_gpu, gpu) = runs
    torch.testing.assert_close(g_gpu, g_host, rtol=0.02, atol=0.02 * float(g_host.abs().max()))
    for name, w in host.items():
        step = (w.float() - start[name].float()).norm()
        gap = (gpu[name].float() - w.float()).norm()
        assert gap <= 0.1 * step + 1e-6, (name, float(gap), float(step))


def test_the_gpu_probe_imports_and_sizes_its_models():
    """bench/probes/offload.py's CPU-side parts: it imports, and the OPT-30B shape's blocks are
    the ~60 GB of bf16 the H200 host (128 GiB) holds once."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "probes" / "offload.py"
    spec = importlib.util.spec_from_file_location("offload_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    cfg = probe.config("opt-30b")
    h, f = cfg.hidden_size, cfg.ffn_dim
    per_block = 4 * h * h + 2 * h * f + 4 * h + f + h + 4 * h  # projections, fc1/fc2, biases, norms
    assert 55 < per_block * cfg.num_hidden_layers * 2 / probe.GB < 62
    assert probe.config("opt-13b", layers=2).num_hidden_layers == 2
