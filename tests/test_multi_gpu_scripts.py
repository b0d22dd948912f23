"""The multi-GPU scripts of bench/multi_gpu (issue 12) dry-run on the CPU: two gloo processes,
each running dp.py, directions.py and fsdp.py on tiny shapes as torchrun would start them;
every run writes rows of exactly the issue's fields with GPU, versions and commit, and its
checks pass (weights bit-identical across ranks after 100 steps, the same iterates as one
process, FSDP2's noise equal to the unsharded model's). The checks can fail (ranks with other
weights), merge.py computes scaling efficiency against the 1-GPU rows and keeps latest.json's
other keys, and bad options or a model too big for its GPUs get one clear error."""

import contextlib
import importlib
import json
import os
import socket
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SCRIPTS = Path(__file__).resolve().parents[1] / "bench" / "multi_gpu"
DRY = ["--backend", "gloo", "--device", "cpu", "--model", "tiny", "--batch", "2", "--seq", "8"]
DRY += ["--steps", "1", "--runs", "1"]
RUNS = {  # script: (its extra options, the JSON it writes with 2 processes)
    "dp": (["--hash-steps", "100"], "dp-2gpu.json"),
    "directions": ([], "directions-2gpu.json"),
    "fsdp": (["--check-model", "tiny"], "fsdp-2gpu-float32.json"),
}
ROW_KEYS = {
    "kind",
    "gpus",
    "model",
    "mode",
    "step_s",
    "examples_per_s",
    "efficiency",
    "peak_over_forward",
    "bytes_per_step",
}
META_KEYS = {"gpu", "torch", "triton", "python", "commit", "date"}


@contextlib.contextmanager
def scripts_importable():
    """bench/multi_gpu importable, sys.path restored afterwards (the scripts' common.py adds
    bench's folders to it)."""
    saved = list(sys.path)
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield
    finally:
        sys.path[:] = saved


def script(name: str):
    with scripts_importable():
        return importlib.import_module(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, ports: list[int], out: str) -> None:
    """One process of the dry run: what torchrun sets, then each script's main."""
    torch.set_num_threads(1)
    env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1"}
    os.environ.update({k: str(v) for k, v in env.items()})
    for (name, (extra, _)), port in zip(RUNS.items(), ports[:-1], strict=True):
        os.environ["MASTER_PORT"] = str(port)
        script(name).main([*DRY, *extra, "--out", out])
    # The checks can fail: ranks holding other weights, a flag false on one rank.
    os.environ["MASTER_PORT"] = str(ports[-1])
    common = script("common")
    with common.process_group(Namespace(backend="gloo", device="cpu")) as (device, _):
        torch.manual_seed(rank)
        check = common.hash_check(torch.nn.Linear(3, 2), steps=0)
        assert not check["identical"] and len(set(check["hashes"])) == world
        assert common.everywhere(True, device) and not common.everywhere(rank == 0, device)
        assert dist.get_world_size() == world


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_dry_runs_write_the_issues_rows_and_pass_their_checks():
    with tempfile.TemporaryDirectory() as out:
        ports = [free_port() for _ in range(len(RUNS) + 1)]
        mp.spawn(worker, args=(2, ports, out), nprocs=2, join=True)
        runs = {
            name: json.loads((Path(out) / file).read_text()) for name, (_, file) in RUNS.items()
        }
        for name, run in runs.items():
            assert run["kind"] == name and run["gpus"] == 2 and run["backend"] == "gloo"
            for r in run["rows"]:
                assert set(r) == ROW_KEYS | META_KEYS, name
                assert r["kind"] == name and r["gpus"] == 2 and r["model"] == "tiny"
                assert r["step_s"] > 0 and r["examples_per_s"] > 0 and r["bytes_per_step"] > 0
                assert r["peak_over_forward"] is None  # no GPU memory on the CPU
        dp = runs["dp"]
        assert [r["mode"] for r in dp["rows"]] == ["inplace", "virtual"]
        assert all(r["bytes_per_step"] == 24 for r in dp["rows"])  # (L+, L−, n) in float64
        for mode in ("inplace", "virtual"):
            check = dp["checks"][f"hash {mode}"]
            assert check["steps"] == 100 and check["identical"] and len(check["hashes"]) == 2
        directions = runs["directions"]
        assert directions["rows"][0]["mode"] == "virtual q=4"
        assert directions["rows"][0]["bytes_per_step"] == 4 * 2 * 8  # all-gathered losses
        assert directions["checks"]["same iterates as one process"] is True
        assert directions["checks"]["hash"]["identical"]
        fsdp = runs["fsdp"]
        assert fsdp["checks"]["noise equals unsharded"] == {
            "model": "tiny",
            "float32": True,
            "bfloat16": True,
        }
        assert fsdp["rows"][0]["efficiency"] > 0 and fsdp["rows"][0]["mode"].startswith("inplace")

        # merge.py: the rows into latest.json, its other keys and other rows kept.
        latest = Path(out) / "latest.json"
        old = {**dp["rows"][0], "kind": "dp", "gpus": 8, "mode": "old"}
        latest.write_text(json.dumps({"gpu": "H200", "steps": [1], "multi_gpu": [old]}))
        files = [str(Path(out) / file) for _, file in RUNS.values()]
        script("merge").main([*files, "--out", out, "--latest", str(latest)])
        merged = json.loads(latest.read_text())
        assert merged["gpu"] == "H200" and merged["steps"] == [1]
        assert len(merged["multi_gpu"]) == 1 + 2 + 1 + 1 and old in merged["multi_gpu"]
        assert "| fsdp | 2 | tiny |" in (Path(out) / "multi_gpu.md").read_text()


def test_efficiency_is_against_the_one_gpu_row():
    merge = script("merge")

    def r(kind, gpus, step_s, examples_per_s, efficiency=None):
        return {"kind": kind, "gpus": gpus, "model": "m", "mode": "x", "step_s": step_s,
                "examples_per_s": examples_per_s, "efficiency": efficiency}  # fmt: skip

    rows = merge.with_efficiency(
        [
            r("dp", 1, 1.0, 16.0),
            r("dp", 4, 1.25, 51.2),  # 51.2 / (4 × 16)
            r("directions", 1, 2.0, 8.0),
            r("directions", 4, 0.625, 25.6),  # speed-up 3.2 on 4 GPUs
            r("fsdp", 2, 3.0, 10.0, efficiency=0.7),  # its own: two forwards ÷ step
            r("dp", 2, 1.0, 32.0) | {"model": "other"},  # no 1-GPU row of its own
        ]
    )
    assert [x["efficiency"] for x in rows] == [1.0, 0.8, 1.0, 0.8, 0.7, None]


def test_bad_options_and_models_too_big_get_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        script("dp").main(["--out", "x", "--backend", "nccl", "--device", "cpu"])
    assert "--backend nccl goes with --device cuda" in capsys.readouterr().err
    fsdp = script("fsdp")
    h200, opt66b = 143_771 * 2**20, 65_719_701_504  # bytes of an H200, OPT-66B's parameters
    assert fsdp.shard_dtype("auto", opt66b, 4, h200) == "float32"  # 66 GB of shards per GPU
    assert fsdp.shard_dtype("auto", opt66b, 2, h200) == "bfloat16"  # float32 would be 131 GB
    assert fsdp.shard_dtype("float32", opt66b, 2, None) == "float32"  # the CPU: no limit
    with pytest.raises(ValueError, match="131 GB per GPU on 1 GPUs"):
        fsdp.shard_dtype("auto", opt66b, 1, h200)
    with pytest.raises(ValueError, match="float32 take 131 GB per GPU on 2 GPUs"):
        fsdp.shard_dtype("float32", opt66b, 2, h200)
