"""What torch.distributed costs zofast on one GPU (H200): world size 1, one process, NCCL.

OPT-1.3B shape, random weights, batch 16×256, LOZO (default mode) and MeZO:

* process_group: the bf16 model in its default exact mode, stepped with ``process_group=`` (one
  all-reduce of (L+, L−, n) per step; no queued finish: the host reads the losses first) beside
  the same optimizer without it;
* FSDP2 with mixed precision: float32 weights, ``fully_shard`` per decoder block and on the root
  with ``MixedPrecisionPolicy(param_dtype=bf16)``, perturbed in place (pipelined) on the shards,
  beside the same float32 weights unsharded, in place, forwards under bf16 autocast.

Each row: forward and step milliseconds (runs of 10 back-to-back calls, one sync per run;
median of 3), step ÷ two forwards, and the bytes communicated per step, by construction (the
all-reduce's 3 float64; FSDP2: every forward all-gathers every parameter in bf16) and measured
(the torch.distributed collectives wrapped and counted over the timed steps). Verifies first:
process_group's iterates equal the plain optimizer's bit for bit (one rank: the same mean),
and FSDP2's g equals (within 5 %, at ε = 1e-2) that of one unsharded process computing the same
bf16 forwards from the same weights.

Usage (GPU machine, repo root): python bench/probes/distributed_ws1.py OUT.json
"""

import collections
import functools
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH / "tools"), str(BENCH / "suites")]
from precision import run_meta  # noqa: E402
from test_steps import OPT_SHAPES, SEQ, back_to_back_ms, random_opt  # noqa: E402

from zofast.optim import LOZO, MeZO  # noqa: E402

NAME, BATCH, VERIFY_STEPS = "opt-1.3b", 16, 3
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "broadcast",
)


class Counted:
    """The collectives of torch.distributed wrapped: calls and bytes (the largest tensor
    argument: an all-gather's output, an all-reduce's buffer) per operation."""

    def __init__(self):
        self.calls, self.bytes = collections.Counter(), collections.Counter()
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
            self.calls[name] += 1
            self.bytes[name] += max((t.numel() * t.element_size() for t in tensors), default=0)
            return fn(*args, **kwargs)

        return counted

    def per_step(self, fn, steps: int) -> dict:
        self.calls.clear()
        self.bytes.clear()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        return {
            name: {"calls": self.calls[name] / steps, "bytes": self.bytes[name] / steps}
            for name in self.calls
        }


def optimizer(method, model, group=None, **options):
    common = dict(lr=1e-7, eps=1e-3, seed=1, process_group=group)
    common.update(options)
    return MeZO(model, **common) if method == "mezo" else LOZO(model, rank=2, nu=50, **common)


def timed(fn) -> float:
    return sorted(back_to_back_ms(fn, calls=10, runs=3))[1]


def float32_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, **OPT_SHAPES[NAME])
    torch.manual_seed(0)
    with torch.device("cuda"):
        return OPTForCausalLM(config).eval()


def g_of(opt) -> list[float]:
    return list(opt.trajectory._g)


def group_rows(counted, model, ids) -> list[dict]:
    """process_group beside the plain optimizer, on the bf16 model (default mode)."""
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def closure():
        return model(input_ids=ids, labels=ids).loss

    forward = timed(closure)
    rows = []
    for method in ("lozo", "mezo"):
        runs = {}
        for grouped in (False, True):  # verify: the same steps from the same weights
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(start[n])
            opt = optimizer(method, model, dist.group.WORLD if grouped else None)
            for _ in range(VERIFY_STEPS):
                opt.step(closure)
            opt.detach()
            runs[grouped] = (g_of(opt), [p.detach().clone() for p in model.parameters()])
        same_g = runs[False][0] == runs[True][0]
        same_w = all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1], strict=True))
        if not (same_g and same_w):
            raise SystemExit(f"{method}: process_group's steps differ from the plain optimizer's")
        for grouped in (False, True):
            opt = optimizer(method, model, dist.group.WORLD if grouped else None)
            step = timed(lambda opt=opt: opt.step(closure))
            rows.append(
                {
                    "method": method,
                    "setup": "process_group ws1" if grouped else "plain",
                    "mode": opt.mode,
                    "forward_ms": forward,
                    "step_ms": step,
                    "step_over_two_forwards": step / (2 * forward),
                    "bytes_by_construction": 24 if grouped else 0,
                    "measured": counted.per_step(lambda opt=opt: opt.step(closure), 5),
                    "verified": "bit for bit (g and weights) after 3 steps",
                }
            )
            opt.detach()
    return rows


def fsdp_rows(counted, ids) -> list[dict]:
    """FSDP2 (mixed precision) beside the unsharded float32 model under bf16 autocast."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cuda", (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    rows = []
    for method in ("lozo", "mezo"):
        plain = float32_opt()
        numel = sum(p.numel() for p in plain.parameters())
        sharded = float32_opt()
        for layer in sharded.model.decoder.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(sharded, mesh=mesh, mp_policy=policy)

        @torch.no_grad()
        def fsdp_closure(model=sharded):
            return model(input_ids=ids, labels=ids).loss

        @torch.no_grad()
        def autocast_closure(model=plain):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(input_ids=ids, labels=ids).loss

        @torch.no_grad()
        def bf16_closure(model=plain):  # what FSDP2's policy computes, without FSDP2
            weights = {n: p.to(torch.bfloat16) for n, p in model.named_parameters()}
            kwargs = {"input_ids": ids, "labels": ids}
            return torch.func.functional_call(model, weights, (), kwargs).loss

        # Verify: one step from the same weights with the same noise, at ε = 1e-2 (L+ − L− far
        # above the bf16 forwards' rounding): FSDP2's g is one process's.
        checks = []
        for model, closure, group in (
            (sharded, fsdp_closure, dist.group.WORLD),
            (plain, bf16_closure, None),
        ):
            check = optimizer(method, model, group, pipeline=True, eps=1e-2)
            check.step(closure)
            check.settle()
            checks.append(g_of(check)[0])
        if abs(checks[0] - checks[1]) > 0.05 * abs(checks[1]):
            raise SystemExit(f"{method}: FSDP2's g {checks[0]}, one process's {checks[1]}")
        gap = abs(checks[0] - checks[1]) / abs(checks[1])
        verified = "g bit for bit" if gap == 0 else f"g within {gap:.1e} (relative)"
        opt = optimizer(method, sharded, dist.group.WORLD, pipeline=True)
        reference = optimizer(method, plain, pipeline=True)
        for label, closure, step_opt in (
            ("fsdp2 ws1 mixed precision", fsdp_closure, opt),
            ("unsharded float32, bf16 autocast", autocast_closure, reference),
        ):
            forward = timed(closure)
            step = timed(lambda o=step_opt, c=closure: o.step(c))
            grouped = step_opt._group is not None
            rows.append(
                {
                    "method": method,
                    "setup": label,
                    "mode": step_opt.mode,
                    "pipeline": True,
                    "forward_ms": forward,
                    "step_ms": step,
                    "step_over_two_forwards": step / (2 * forward),
                    "bytes_by_construction": (24 + 2 * 2 * numel) if grouped else 0,
                    "measured": counted.per_step(lambda o=step_opt, c=closure: o.step(c), 5),
                    "verified": verified,
                }
            )
        del opt, reference, plain, sharded
        torch.cuda.empty_cache()
    return rows


def main():
    out = Path(sys.argv[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    counted = Counted()
    try:
        model, ids = random_opt(NAME, BATCH)
        rows = group_rows(counted, model, ids)
        del model
        torch.cuda.empty_cache()
        rows += fsdp_rows(counted, ids)
    finally:
        dist.destroy_process_group()
    payload = {
        **run_meta("cuda"),
        "shape": NAME,
        "batch": BATCH,
        "seq": SEQ,
        "world_size": 1,
        "backend": "nccl",
        "bytes_note": "by construction: process_group all-reduces 3 float64 (24 B) per step; "
        "FSDP2 all-gathers every parameter in bf16 at each of the 2 forwards (output bytes; "
        "with one rank nothing crosses a wire). measured: the largest tensor of each "
        "collective call, per step",
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    for row in rows:
        print(
            f"{row['method']:5s} {row['setup']:34s} {row['mode']:8s} forward "
            f"{row['forward_ms']:7.2f} ms  step {row['step_ms']:7.2f} ms  "
            f"÷2fwd {row['step_over_two_forwards']:.2f}  bytes {row['bytes_by_construction']}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
