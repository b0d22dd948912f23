"""Streamed offload (zofast.offload): block weights on the host, copied to the compute device
block by block. On the CPU the compute device is the CPU itself: every swap, buffer ring and
copy still runs (a stand-in device), so the iterates must equal the plain run's bit for bit for
every optimizer and mode; the GPU test streams a tiny OPT from pinned host memory to cuda:0."""

from __future__ import annotations

import pytest
import torch
from helpers_models import optimizer, weights

from zofast import offload, paired

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
