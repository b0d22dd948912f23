"""What the multi-GPU scripts (dp.py, directions.py, fsdp.py) share: the process group under
torchrun, OPT-shaped models with random weights, timing, peak memory, bytes counted, the
per-rank weight hashes, and the rows they write.

Every script runs under torchrun, one process per GPU (NCCL), or with ``--backend gloo --device
cpu`` on the CPU (the dry run of tests/test_multi_gpu_scripts.py). NVLink multicast stays off:
the variables of MULTICAST_OFF are set before the process group starts.
"""

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH / "tools"), str(BENCH / "suites"), str(BENCH / "probes")]
from distributed_ws1 import Counted  # noqa: E402
from precision import run_meta  # noqa: E402
from test_steps import OPT_SHAPES  # noqa: E402

SHAPES = {
    **OPT_SHAPES,
    "opt-66b": dict(hidden_size=9216, num_hidden_layers=64, ffn_dim=36864, num_attention_heads=72),
    # The CPU dry run: every code path of the scripts in seconds.
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, vocab_size=1000
    ),
}
ROW_KEYS = (
    "kind",
    "gpus",
    "model",
    "mode",
    "step_s",
    "examples_per_s",
    "efficiency",
    "peak_over_forward",
    "bytes_per_step",
)
META_KEYS = ("gpu", "torch", "triton", "python", "commit", "date")
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def parser(doc: str, model: str, steps: int) -> argparse.ArgumentParser:
    """The options every script takes; `model` and `steps` are the script's defaults."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for this run's JSON")
    p.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--model", choices=list(SHAPES), default=model, help="OPT shape")
    p.add_argument("--batch", type=int, default=16, help="examples per rank (default 16)")
    p.add_argument("--seq", type=int, default=256, help="tokens per example (default 256)")
    p.add_argument("--steps", type=int, default=steps, help="back-to-back steps per timed run")
    p.add_argument("--runs", type=int, default=3, help="timed runs, median reported (default 3)")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The options, with one clear error for those that cannot go together."""
    args = p.parse_args(argv)
    if (args.backend == "nccl") != (args.device == "cuda"):
        p.error("--backend nccl goes with --device cuda, --backend gloo with --device cpu")
    for name in ("batch", "seq", "steps", "runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be ≥ 1")
    if "RANK" not in os.environ:
        p.error("run under torchrun: torchrun --standalone --nproc-per-node N " + sys.argv[0])
    return args


@contextlib.contextmanager
def process_group(args):
    """(device, Counted) of this rank inside its process group; on success every rank meets
    at a barrier before the group is torn down (a rank whose peer closed first could abort)."""
    os.environ.update(MULTICAST_OFF)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)
    try:
        yield device, Counted()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def opt_config(name: str):
    from transformers import OPTConfig

    return OPTConfig(**{"vocab_size": 50272, "max_position_embeddings": 2048, **SHAPES[name]})


def build(name: str, device, dtype=torch.bfloat16, seed: int = 0):
    """An OPT-shaped model with seeded random weights: the same on every rank."""
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return OPTForCausalLM(opt_config(name)).to(dtype).eval()


def token_ids(config, args, device, seed: int) -> torch.Tensor:
    """batch × seq random token ids; ranks that pass their rank as `seed` hold their own shard."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (args.batch, args.seq)
    return torch.randint(0, config.vocab_size, shape, device=device, generator=gen)


def lozo(model, mode: str, group, **options):
    """The LOZO every row measures (rank 2, ν = 50); in place pipelined, as the step rows."""
    from zofast.optim import LOZO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 in place warns of drift: timing rows ask for it
        return LOZO(
            model,
            lr=1e-7,
            eps=1e-3,
            rank=2,
            nu=50,
            seed=1,
            mode=mode,
            pipeline=mode == "inplace",
            process_group=group,
            **options,
        )


def finish(opt) -> None:
    """The stored weights become the iterate (settled; hooks off outside in place)."""
    opt.settle()
    if opt.mode != "inplace":
        opt.detach()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device, calls: int, runs: int) -> float:
    """Median seconds per call over `runs` runs of `calls` back-to-back calls (one sync per run,
    as a training loop runs), after one warm-up call; the slowest rank's."""
    fn()
    per_call = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        per_call.append((time.perf_counter() - start) / calls)
    return most(sorted(per_call)[len(per_call) // 2], device)


def most(value, device):
    """The largest `value` over the ranks (None where every rank has None)."""
    if value is None:
        return None
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def everywhere(flag: bool, device) -> bool:
    """Whether `flag` holds on every rank."""
    return most(-float(flag), device) == -1.0


def peak_bytes(fn, device) -> int | None:
    """Peak GPU memory allocated while fn runs (None on the CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def peak_over(step_peak, forward_peak, device):
    """step ÷ forward peak memory, the largest over the ranks (None on the CPU)."""
    if step_peak is None:
        return None
    return most(step_peak / forward_peak, device)


def bytes_per_step(counted: Counted, step, device, steps: int = 3) -> float:
    """Bytes of the collectives per step on this rank (each call's largest tensor: an
    all-reduce's buffer, an all-gather's output), counted over `steps` steps."""
    sync(device)
    counted.calls.clear()
    counted.bytes.clear()
    for _ in range(steps):
        step()
    sync(device)
    return sum(counted.bytes.values()) / steps


def weights_digest(model) -> str:
    """sha256 of every parameter's name and bytes (this rank's shards under FSDP2)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        h.update(name.encode())
        h.update(local.detach().reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def hash_check(model, steps: int) -> dict:
    """Every rank's weight hash after `steps` steps, and whether they are all the same."""
    hashes = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, weights_digest(model))
    return {"steps": steps, "hashes": hashes, "identical": len(set(hashes)) == 1}


def row(kind, gpus, model, mode, step_s, examples_per_s, peak, nbytes, efficiency=None) -> dict:
    """One row of the issue's fields (efficiency: the script's where it needs no other run,
    else None and bench/multi_gpu/merge.py fills it in against the 1-GPU run)."""
    values = (kind, gpus, model, mode, step_s, examples_per_s, efficiency, peak, nbytes)
    return dict(zip(ROW_KEYS, values, strict=True))


def write(args, kind: str, rows: list[dict], checks: dict, name: str | None = None) -> None:
    """Rank 0 writes OUT/<name>.json: the rows (with GPU, versions and commit), the checks and
    the options; exits non-zero after writing when a check failed."""
    meta = run_meta(args.device)
    meta["gpu"] = meta.pop("device")
    meta = {k: meta[k] for k in META_KEYS}
    gpus = dist.get_world_size()
    failed = [label for label, ok in passed(checks) if not ok]
    if dist.get_rank() == 0:
        payload = {
            "kind": kind,
            "gpus": gpus,
            "backend": args.backend,
            "options": vars(args),
            "rows": [{**r, **meta} for r in rows],
            "checks": checks,
        }
        path = Path(args.out) / f"{name or f'{kind}-{gpus}gpu'}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1) + "\n")
        for r in rows:
            print(" ".join(f"{k}={r[k]}" for k in ROW_KEYS))
        print(f"checks: {json.dumps(checks)}\nwrote {path}")
    if failed:
        raise SystemExit(f"{kind} on {gpus} ranks: checks failed: {', '.join(failed)}")


def passed(checks: dict):
    """(label, ok) of every check: the hash checks' "identical", the other checks' booleans."""
    for label, value in checks.items():
        if isinstance(value, dict) and "identical" in value:
            yield label, value["identical"]
        elif isinstance(value, dict):
            yield from ((f"{label}.{k}", ok) for k, ok in passed(value))
        elif isinstance(value, bool):
            yield label, value
