"""Streamed offload through the front doors: ``zofast train --offload`` (TrainConfig.offload) and
``ZOTrainer(zo_offload=True)``.

The CPU stands in for the GPU, as in tests/test_offload.py (``STREAM_TO`` admits "cpu"): every
swap, buffer ring and copy runs, so a streamed run must equal the run without offload bit for
bit: trajectories, evaluations, the best checkpoint, saved weights, resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from helpers_models import make_tiny_model, weights
from safetensors.torch import load_file

from zofast import cli, offload, offload_host
from zofast.models import LoadedModel, load_model
from zofast.train import ConfigError, TrainConfig, methods, resume, streaming, train

pytestmark = pytest.mark.usefixtures("one_thread")

TIMINGS = {"elapsed", "steps_per_s", "seconds", "train_seconds"}


@pytest.fixture
def stand_in(monkeypatch):
    """The CPU stands in for the GPU; returns the Streamed handles the runs made."""
    monkeypatch.setattr(streaming, "STREAM_TO", ("cuda", "cpu"))
    handles = []

    def spy(*args, **kwargs):
        handles.append(stream(*args, **kwargs))
        return handles[-1]

    stream = offload.stream
    monkeypatch.setattr(offload, "stream", spy)
    return handles


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return str(make_tiny_model("opt", tmp_path_factory.mktemp("offload") / "opt"))


def settings(model, **extra):
    base = dict(
        model=model, steps=6, eval_every=3, batch_size=4, lr=1e-2, nu=2, seed=5, device="cpu",
        checkpoint_every=2, progress=False, plot=False, zero_shot_test=False, save_model=True,
        dtype="bfloat16",
    )  # fmt: skip
    return {**base, **extra}


def result(path) -> dict:
    out = json.loads(Path(path).read_text())
    differ = ("output_dir", "paired", "offload", "offload_update", "prefetch")
    out["config"] = {k: v for k, v in out["config"].items() if k not in differ}
    return {k: v for k, v in out.items() if k not in TIMINGS | {"output_dir", "files"}}


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("trajectory.json", "trajectory-best.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    wa, wb = (load_file(p / "model" / "model.safetensors") for p in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert result(a / "result.json") == result(b / "result.json")


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("lozo", {}),  # offload's default for LOZO: paired
        ("lozo", {"paired": False, "prefetch": 2}),
        ("lozo-m", {"offload_update": "gpu"}),
        ("mezo", {"dtype": "float32"}),  # in place: perturbations written to the host tensors
        ("mezo", {"weight_decay": 0.1, "offload_update": "gpu"}),  # shadow
    ],
)
def test_offloaded_runs_equal_the_resident_run_bit_for_bit(
    stand_in, opt_dir, tmp_path, method, extra
):
    config = TrainConfig(**settings(opt_dir, method=method, offload=True, **extra))
    a = train(dataclasses.replace(config, output_dir=str(tmp_path / "a")))
    (handle,) = stand_in
    assert handle.uploads >= 6 * len(handle.blocks) and not handle._handles, "removed at the end"
    assert (handle.writes is not None) == (extra.get("offload_update") == "gpu")
    assert handle.writes is None or handle.writes.writes > 0
    plain = {k: v for k, v in extra.items() if k not in ("offload_update", "prefetch")}
    plain["paired"] = config.resolved_paired
    b = train(
        TrainConfig(**settings(opt_dir, method=method, output_dir=str(tmp_path / "b"), **plain))
    )
    assert a.best_step == b.best_step and a.history == b.history
    assert_same_run(tmp_path / "a", tmp_path / "b")
    log = json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[0])
    assert log["resolved"]["paired"] == (method != "mezo" and extra.get("paired") is not False)


def test_resume_of_an_offloaded_run_ends_bit_for_bit(stand_in, opt_dir, tmp_path, monkeypatch):
    config = settings(opt_dir, method="lozo", offload=True)
    train(TrainConfig(**config, output_dir=str(tmp_path / "a")))
    advance = methods.ZerothOrder.advance

    def crashing(self, periods):
        if self.position >= 5:
            raise KeyboardInterrupt
        return advance(self, periods)

    with monkeypatch.context() as patch:
        patch.setattr(methods.ZerothOrder, "advance", crashing)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**config, output_dir=str(tmp_path / "b")))
    assert not stand_in[1]._handles, "the hooks come off however the run ends"
    resumed = resume(tmp_path / "b")
    assert resumed.config.offload and stand_in[2].uploads > 0
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_zofast_train_offload(stand_in, opt_dir, tmp_path, capsys):
    flags = ["train", "--model", opt_dir, "--steps", "3", "--eval-every", "3", "--batch-size", "4",
             "--lr", "1e-2", "--no-progress", "--no-plot", "--no-zero-shot-test",
             "--checkpoint-every", "0", "--device", "cpu", "--dtype", "bfloat16"]  # fmt: skip
    a, b = tmp_path / "plain", tmp_path / "streamed"
    assert cli.main([*flags, "--paired", "--output-dir", str(a)]) == 0
    assert cli.main([*flags, "--offload", "--prefetch", "2", "--output-dir", str(b)]) == 0
    assert (a / "trajectory.json").read_bytes() == (b / "trajectory.json").read_bytes()
    assert stand_in[0].prefetch == 2 and stand_in[0].uploads > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--offload", "--device", "cpu"], "offload streams the blocks to a GPU"),  # no stand-in
        (["--offload", "--method", "adam"], "offload is for lozo, lozo-m, mezo"),
        (["--offload", "--method", "dfo-lora"], "offload is for"),
        (["--offload", "--device-map", '{"model": "cpu", "lm_head": "cpu"}'], "not both"),
        (["--prefetch", "2"], "apply with offload only"),
        (["--offload", "--prefetch", "0"], "prefetch must be an integer >= 1"),
        (["--offload", "--offload-update", "disk"], "offload_update must be one of host, gpu"),
        (["--offload", "--mode", "inplace", "--paired"], "paired needs an exact mode"),
    ],
)
def test_bad_offload_settings_are_refused_before_anything_is_written(
    opt_dir, tmp_path, capsys, extra, message
):
    out = tmp_path / "run"
    flags = ["train", "--model", opt_dir, "--steps", "2", "--no-progress", "--output-dir", str(out)]
    assert cli.main([*flags, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not out.exists()


def test_under_torchrun_offload_is_refused(opt_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="offload runs in one process"):
        train(TrainConfig(model=opt_dir, offload=True, output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_models_that_cannot_stream_are_refused_before_anything_is_written(
    stand_in, opt_dir, tmp_path
):
    tied = load_model(opt_dir)
    tied.model.lm_head.weight = tied.model.model.decoder.layers[0].fc1.weight
    before = weights(tied.model)
    config = TrainConfig(**settings(opt_dir, offload=True, output_dir=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="tied"):
        train(config, loaded=tied)
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(p, before[n]) for n, p in weights(tied.model).items())
    flat = LoadedModel(torch.nn.Linear(2, 2), None, "encoder", "linear")
    with pytest.raises(ConfigError, match="no repeated blocks"), streaming.streaming(config, flat):
        pass


def test_saved_weights_of_a_pinned_buffer_are_the_host_tensors(opt_dir, tmp_path, monkeypatch):
    """On a GPU the block tensors are views of one registered host buffer: transformers' saving
    (which looks for tensors sharing storage) must write each of them, as they are."""
    monkeypatch.setattr(offload_host, "cuda_register", lambda ptr, n: None)
    monkeypatch.setattr(offload_host, "cuda_unregister", lambda ptr: None)
    model = load_model(opt_dir, dtype="bfloat16").model
    handle = offload.stream(model, device="cpu", pin=True)
    assert handle.host_buffer.packed
    with torch.no_grad():
        for _, block in handle.blocks:
            block.fc1.weight.add_(1)  # the host tensors, changed in place
    expected = weights(model)
    model.save_pretrained(tmp_path / "saved")
    handle.remove()
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert set(saved) <= set(expected)
    assert all(torch.equal(t, expected[n]) for n, t in weights(reloaded).items())


def _trainer_inputs(path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(["It was great.", "It was terrible.", "Bad.", "Good."] * 2, padding=True)
    rows = [
        {"input_ids": torch.tensor(i), "attention_mask": torch.tensor(m), "labels": torch.tensor(i)}
        for i, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)
    ]
    return rows


def _recorded(apply, calls: list):
    def recording(fn, *args, **kwargs):
        calls.append(fn)
        return apply(fn, *args, **kwargs)

    return recording


def test_zo_trainer_offload_trains_and_saves_the_host_tensors(stand_in, tmp_path):
    from zofast.hf import ZOTrainer, ZOTrainingArguments

    path = make_tiny_model("gpt2", tmp_path / "gpt2")
    rows = _trainer_inputs(path)
    runs = []
    for zo_offload in (False, True):
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        moves = []
        model._apply = _recorded(model._apply, moves)
        args = ZOTrainingArguments(
            str(tmp_path / f"out{zo_offload}"), max_steps=4, per_device_train_batch_size=4,
            learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, seed=3, zo_paired=True, zo_offload=zo_offload,
        )  # fmt: skip
        trainer = ZOTrainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        trainer.save_model(str(tmp_path / f"saved{zo_offload}"))
        assert bool(moves) != zo_offload, "a streamed model is never moved by Trainer"
        runs.append((trainer.trajectory.to_dict(), weights(model)))
        if zo_offload:
            assert trainer.streamed.uploads >= 4 * len(trainer.streamed.blocks)
            trainer.streamed.remove()
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(w, runs[1][1][n]) for n, w in runs[0][1].items())
    saved = load_file(tmp_path / "savedTrue" / "model.safetensors")
    assert all(torch.equal(t, runs[0][1][n]) for n, t in saved.items())


def test_zo_trainer_refuses_what_cannot_stream(tmp_path, monkeypatch):
    from zofast.hf import ZOTrainer, ZOTrainingArguments
    from zofast.optim import LOZO

    path = make_tiny_model("gpt2", tmp_path / "gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    args = ZOTrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to=[], zo_offload=True)
    with pytest.raises(ValueError, match="to a GPU"):
        ZOTrainer(model=model, args=args, train_dataset=[])
    monkeypatch.setattr(streaming, "STREAM_TO", ("cuda", "cpu"))
    with pytest.raises(ValueError, match="leave optimizers out"):
        ZOTrainer(model=model, args=args, optimizers=(LOZO(model, lr=1e-3), None))
    assert not hasattr(model, "hf_device_map")


@pytest.mark.gpu
def test_zofast_train_offload_on_a_gpu(opt_dir, tmp_path, monkeypatch):
    """A tiny OPT streamed from pinned host memory to cuda:0 through train(): the blocks stay on
    the host (registered) while the run computes on the GPU, and the trajectory tracks the run
    resident on cuda:0 within the rounding of the updates (the GPU's kernels write them there,
    the host engine here: the normals differ in float32 rounding)."""
    from zofast.trajectory import Trajectory

    seen = []
    stream = offload.stream

    def spy(*args, **kwargs):
        handle = stream(*args, **kwargs)
        block = handle.blocks[0][1]
        seen.append((handle, [(p.device.type, p.is_pinned()) for p in block.parameters()]))
        return handle

    monkeypatch.setattr(offload, "stream", spy)
    common = settings(opt_dir, device="cuda", paired=True, checkpoint_every=3)
    train(TrainConfig(**common, output_dir=str(tmp_path / "a")))
    train(TrainConfig(**common, offload=True, output_dir=str(tmp_path / "b")))
    ((handle, placed),) = seen
    assert placed and all(where == ("cpu", True) for where in placed)
    assert handle.host_buffer.ptr is None and handle.uploads >= 6 * len(handle.blocks)
    one, streamed = (Trajectory.load(tmp_path / n / "trajectory.json") for n in ("a", "b"))
    assert streamed.device == "cpu+cuda"
    g_one, g_s = (torch.tensor(list(t._g)) for t in (one, streamed))
    torch.testing.assert_close(g_s, g_one, rtol=0.05, atol=0.05 * float(g_one.abs().max()))
    resumed = resume(tmp_path / "b")  # a finished run's last checkpoint: its files again
    assert resumed.steps == 6


@pytest.mark.gpu
def test_zo_trainer_offload_on_a_gpu(tmp_path):
    """Trainer and accelerate leave a streamed model where it is on a real GPU (blocks pinned
    on the host, the rest on cuda:0), and save_model writes the trained host tensors."""
    from zofast.hf import ZOTrainer, ZOTrainingArguments

    path = make_tiny_model("gpt2", tmp_path / "gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    args = ZOTrainingArguments(
        str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="no", report_to=[], disable_tqdm=True, zo_paired=True, zo_offload=True,
    )  # fmt: skip
    trainer = ZOTrainer(model=model, args=args, train_dataset=_trainer_inputs(path))
    trainer.train()
    blocks = [p for _, b in trainer.streamed.blocks for p in b.parameters()]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in blocks)
    assert model.lm_head.weight.is_cuda and trainer.trajectory.steps == 3
    trainer.save_model(str(tmp_path / "saved"))
    expected = weights(model)
    trainer.streamed.remove()
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert all(torch.equal(t, expected[n]) for n, t in saved.items())
