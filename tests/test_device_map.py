"""Models split over several devices (zofast.device_map): every optimizer and mode groups its
tensors by device, each device with its own passes and graphs.

A CPU has one device, so the CPU tests split the tensors at a fake device boundary (the grouping
key patched: the passes, graphs and factor launches then run per group exactly as they would per
device) and run models carrying accelerate's dispatch hooks; the GPU test splits a tiny OPT
between cuda:0 and the CPU for real."""

from __future__ import annotations

import collections
import types

import pytest
import torch
from helpers_models import optimizer, weights

from zofast import device_map
from zofast.perturb import gaussian_, lowrank_

pytestmark = pytest.mark.usefixtures("one_thread")

# (method, weight dtype, optimizer options): every optimizer, in place (pipelined or not, with
# weight decay) and in its default exact mode.
CASES = [
    ("mezo", "float32", {}),
    ("mezo", "float32", {"pipeline": True, "weight_decay": 0.1}),
    ("lozo", "float32", {"pipeline": True}),
    ("lozo-m", "float32", {}),
    ("mezo", "bfloat16", {}),
    ("lozo", "bfloat16", {}),
    ("lozo", "bfloat16", {"mode": "shadow"}),
    ("lozo-m", "bfloat16", {}),
]
STEPS = 6  # nu = 4: step 4 refreshes V


def tiny_opt(dtype="float32", layers=4):
    """A tiny OPTForCausalLM built from a config (tied embedding / LM head), seeded."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=layers, ffn_dim=64,
        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return OPTForCausalLM(config).to(getattr(torch, dtype)).eval()


def ids(device="cpu"):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (4, 12), generator=gen).to(device)


def run(method, dtype, options, model=None, steps=STEPS, device="cpu"):
    model = tiny_opt(dtype) if model is None else model
    opt = optimizer(method, model, options)
    x = ids(device)
    for _ in range(steps):
        opt.step(lambda: model(input_ids=x, labels=x).loss.float())
    opt.detach()
    return model, opt


def assert_same(a, b):
    for name in a:
        assert torch.equal(a[name], b[name]), name


def fake_devices(slot) -> tuple:
    """A device boundary on one CPU: even flat indices on one 'device', odd ones on another."""
    return ("fake", slot.index % 2)


@pytest.mark.parametrize(("method", "dtype", "options"), CASES)
def test_tensors_split_at_a_device_boundary_train_bit_for_bit(monkeypatch, method, dtype, options):
    plain_model, plain = run(method, dtype, options)
    monkeypatch.setattr(device_map, "device_of", fake_devices)
    split_model, split = run(method, dtype, options)
    parts = [p for p in (split._inplace, split._shadow) if p is not None and p.slots]
    assert parts and all(len(p.passes.devices) == 2 for p in parts)
    for part in parts:
        for group in part.passes.devices:
            side = group.slots[0].index % 2
            assert group.slots == [s for s in part.slots if s.index % 2 == side]
    assert split.mode == plain.mode and split.trajectory.to_dict() == plain.trajectory.to_dict()
    assert_same(weights(split_model), weights(plain_model))


class _AnyKey(dict):
    """A graphs table that hands out a stand-in for every key asked for."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def get(self, key, default=None):
        return self.setdefault(key, self.make(key))


class _EagerGraph:
    """Stands in for a device's GraphedPass on the CPU: applies a replayed table with one engine
    call per tensor of that device (what the graph's launches compute, bit for bit)."""

    stale = False

    def __init__(self, part, key, replays):
        self.part, self.replays = part, replays
        self.terms, self.split, self.stochastic, self.scaled = key

    def replay_table(self, seeds, scales, edit_scales=None):
        assert seeds.shape[0] == scales.shape[0] == len(self.part.slots)
        scales = torch.from_numpy(scales.copy())
        if edit_scales is not None:
            edit_scales(scales)
        self.replays[id(self.part)] += 1
        T = self.terms
        for row, slot in enumerate(self.part.slots):
            terms = [int(x) for x in seeds[row, :T]]
            extra = {"round_seed": int(seeds[row, -1])} if self.stochastic else {}
            if self.scaled:
                extra["w_scale"] = float(scales[row, T])
            if slot.rank:
                v = [int(x) for x in seeds[row, T : T + 1 + (self.split > 0)]]
                vs = [v[1] if self.split and k >= self.split else v[0] for k in range(T)]
                lowrank_(slot.param, terms, vs, slot.rank, scales[row, :T].tolist(), **extra)
            else:
                gaussian_(slot.param, terms, scales[row, :T].tolist(), **extra)


@pytest.mark.parametrize(
    ("method", "dtype", "options"),
    [
        ("mezo", "float32", {"pipeline": True}),
        ("lozo", "float32", {}),
        ("mezo", "bfloat16", {"accumulate": 1}),  # (an update pass per step, counted below)
    ],
)
def test_each_device_replays_its_own_graph(monkeypatch, method, dtype, options):
    """Graphs stood in for on the CPU: every pass replays one graph per device, whose tables
    hold that device's tensors only; the run equals the one-device eager run bit for bit (the
    queued finish, which needs one device, steps aside)."""
    plain_model, plain = run(method, dtype, options)
    monkeypatch.setattr(device_map, "device_of", fake_devices)
    model = tiny_opt(dtype)
    opt = optimizer(method, model, options)
    part = opt._shadow if opt._shadow is not None else opt._inplace
    replays = collections.Counter()
    for group in part.passes.devices:
        group.graphs = _AnyKey(lambda key, group=group: _EagerGraph(group, key, replays))
    assert part.passes.graphs is None and len(part.passes.devices) == 2
    x = ids()
    for _ in range(STEPS):
        opt.step(lambda: model(input_ids=x, labels=x).loss.float())
    opt.detach()
    # shadow: the update pass; in place: +ε, −2ε, the update (pipelined: the first +ε, then
    # two per step, and the settle at the end)
    passes = {"shadow": STEPS, "inplace": 3 * STEPS}[opt.mode]
    if options.get("pipeline"):
        passes = 2 * STEPS + 2
    assert sorted(replays.values()) == [passes, passes]
    assert opt.trajectory.to_dict() == plain.trajectory.to_dict()
    assert_same(weights(model), weights(plain_model))


def _accelerate_split(model):
    """accelerate's dispatch hooks on every module (all on the CPU: force_hooks), with the CPU
    as the main device: what zofast.device_map.dispatch makes of a map with CPU layers."""
    accelerate = pytest.importorskip("accelerate")
    names = ["model.decoder.embed_tokens", "model.decoder.embed_positions", "lm_head"]
    names += ["model.decoder.final_layer_norm"]
    names += [f"model.decoder.layers.{i}" for i in range(len(model.model.decoder.layers))]
    accelerate.dispatch_model(
        model, device_map=dict.fromkeys(names, "cpu"), main_device="cpu", force_hooks=True
    )
    return model


@pytest.mark.parametrize(("method", "dtype", "options"), CASES)
def test_a_model_with_accelerates_dispatch_hooks_trains_bit_for_bit(method, dtype, options):
    plain_model, plain = run(method, dtype, options)
    model = _accelerate_split(tiny_opt(dtype))
    linear = model.model.decoder.layers[0].fc1
    assert "forward" in vars(linear) and device_map.moves_inputs_only(linear)
    hooked_model, hooked = run(method, dtype, options, model=model)
    assert hooked.mode == plain.mode
    if plain.mode == "virtual":  # the hooked layers still count as stock ones
        assert hooked.virtual_names == plain.virtual_names and plain.virtual_names
    assert hooked.trajectory.to_dict() == plain.trajectory.to_dict()
    assert_same(weights(hooked_model), weights(plain_model))


def test_by_device_keeps_first_appearance_and_order():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    slots = [types.SimpleNamespace(param=torch.empty(1, device=d), i=i) for i, d in
             enumerate([cpu, meta, cpu, meta, meta])]  # fmt: skip
    groups = device_map.by_device(slots)
    assert [[s.i for s in g] for g in groups] == [[0, 2], [1, 3, 4]]
    assert device_map.device_types(s.param for s in slots) == "cpu+meta"
    assert device_map.by_device([]) == []


def test_moves_inputs_only_accepts_accelerates_input_moves_alone():
    hooks = pytest.importorskip("accelerate.hooks")
    moved = torch.nn.Linear(3, 2)
    hooks.add_hook_to_module(moved, hooks.AlignDevicesHook(execution_device="cpu"))
    offloaded = torch.nn.Linear(3, 2)
    hooks.add_hook_to_module(offloaded, hooks.AlignDevicesHook(execution_device="cpu"))
    offloaded._hf_hook.offload = True  # weights held outside the module between forwards
    custom = torch.nn.Linear(3, 2)
    custom.forward = lambda x: x
    assert device_map.moves_inputs_only(moved)
    assert not device_map.moves_inputs_only(offloaded)
    assert not device_map.moves_inputs_only(custom)
    assert not device_map.moves_inputs_only(torch.nn.Linear(3, 2))
    from zofast.virtual import layer_kind

    assert layer_kind(moved) == "linear" and layer_kind(custom) is None


def test_device_maps_are_parsed_and_checked():
    assert device_map.parse("auto") == "auto"
    assert device_map.parse('{"a": 0, "b": "cpu", "c": "cuda:1"}') == {
        "a": 0,
        "b": "cpu",
        "c": "cuda:1",
    }
    for bad, match in [
        ("balanced", "JSON object"),
        ("[1, 2]", "JSON object"),
        ('{"a": "disk"}', "'disk'"),
        ('{"a": "tpu"}', "not cpu, cuda:N or N"),
        ('{"a": -1}', "not cpu, cuda:N or N"),
        ('{"a": true}', "not cpu, cuda:N or N"),
    ]:
        with pytest.raises(ValueError, match=match):
            device_map.parse(bad)
    pytest.importorskip("accelerate")
    gpus = torch.cuda.device_count()
    with pytest.raises(ValueError, match="torch sees"):
        device_map.dispatch(torch.nn.Sequential(torch.nn.Linear(2, 2)), {"0": gpus})
    split_tied = {"model.decoder": "cpu", "lm_head": gpus}
    with pytest.raises(ValueError, match="tied weights"):
        device_map.dispatch(tiny_opt(), split_tied)


def test_load_model_with_a_device_map(tiny_model_dirs):
    pytest.importorskip("accelerate")
    from zofast.models import load_model

    path = tiny_model_dirs["opt"]
    plain = load_model(path)
    names = ["model.decoder", "lm_head"]
    loaded = load_model(path, device_map=dict.fromkeys(names, "cpu"))
    assert loaded.device == torch.device("cpu")
    assert_same(weights(loaded.model), weights(plain.model))
    with pytest.raises(ValueError, match="device or device_map"):
        load_model(path, device="cpu", device_map="auto")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("method", "dtype", "options"),
    [(m, d, {}) for m in ("mezo", "lozo", "lozo-m") for d in ("float32", "bfloat16")]
    + [("lozo", "float32", {"pipeline": True})],
)
def test_opt_split_between_cuda_and_cpu_trains_as_on_one_gpu(method, dtype, options):
    """Layers 0 and 2 (and the embeddings, the tied head) on cuda:0, layers 1 and 3 and the
    final norm on the CPU: iterates within the float rounding of the forwards (which differ
    between the CPU and the GPU) of the run on cuda:0 alone."""
    start = weights(tiny_opt(dtype))
    one_model, one = run(method, dtype, options, model=tiny_opt(dtype).cuda(), device="cuda")
    split = {
        "model.decoder.embed_tokens": 0, "model.decoder.embed_positions": 0, "lm_head": 0,
        "model.decoder.layers.0": 0, "model.decoder.layers.1": "cpu",
        "model.decoder.layers.2": 0, "model.decoder.layers.3": "cpu",
        "model.decoder.final_layer_norm": "cpu",
    }  # fmt: skip
    model = device_map.dispatch(tiny_opt(dtype), split)
    types_ = {p.device.type for p in model.parameters()}
    assert types_ == {"cpu", "cuda"}
    split_model, opt = run(method, dtype, options, model=model, device="cuda")
    assert opt.mode == one.mode and opt.trajectory.device == "cpu+cuda"
    assert opt.virtual_names == one.virtual_names  # accelerate's wrappers count as stock layers
    for part in (opt._inplace, opt._shadow):
        if part is not None and part.slots:
            kinds = [g.slots[0].param.device.type for g in part.passes.devices]
            assert sorted(kinds) == ["cpu", "cuda"]
            gpu = next(g for g in part.passes.devices if g.slots[0].param.is_cuda)
            if part is opt._inplace or opt._momentum is None:  # (LOZO-M's shadow: per tensor)
                assert gpu.graphs, "the GPU's passes replayed no graph"
    g_split, g_one = (torch.tensor(list(t.trajectory._g)) for t in (opt, one))
    rtol = 0.05 if dtype == "bfloat16" else 1e-3  # of g, and of the largest g (small g's)
    torch.testing.assert_close(g_split, g_one, rtol=rtol, atol=rtol * float(g_one.abs().max()))
    moved_split, moved_one = weights(split_model), weights(one_model)
    tol = 0.15 if dtype == "bfloat16" else 1e-2
    for name, w in moved_one.items():
        step = (w.float() - start[name].float()).norm()
        gap = (moved_split[name].float() - w.float()).norm()
        assert gap <= tol * step + 1e-6, (name, float(gap), float(step))


def test_zofast_train_with_a_device_map(tiny_model_dirs, tmp_path, capsys):
    """`zofast train --device-map` loads through zofast.device_map and trains as without it
    (one CPU: the same numbers); bad maps and combinations are refused before anything runs."""
    pytest.importorskip("accelerate")
    from zofast import cli
    from zofast.trajectory import Trajectory

    flags = ["train", "--model", str(tiny_model_dirs["opt"]), "--steps", "3", "--eval-every", "3"]
    flags += ["--batch-size", "4", "--lr", "1e-2", "--no-progress", "--no-plot"]
    flags += ["--no-zero-shot-test", "--checkpoint-every", "0"]
    a, b = tmp_path / "plain", tmp_path / "mapped"
    assert cli.main([*flags, "--device", "cpu", "--output-dir", str(a)]) == 0
    mapped = '{"model.decoder": "cpu", "lm_head": "cpu"}'
    assert cli.main([*flags, "--device-map", mapped, "--output-dir", str(b)]) == 0
    ta, tb = (Trajectory.load(p / "trajectory.json") for p in (a, b))
    assert ta.to_dict() == tb.to_dict()
    for extra, message in [
        (["--device-map", "balanced"], "JSON object"),
        (["--device-map", mapped, "--device", "cpu"], "not both"),
    ]:
        capsys.readouterr()
        assert cli.main([*flags, *extra, "--output-dir", str(tmp_path / "bad")]) == 2, extra
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    from zofast.train import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="device_map is for"):
        TrainConfig(method="dfo-lora", device_map=mapped).validate()
