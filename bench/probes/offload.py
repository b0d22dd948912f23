"""Streamed offload (zofast.offload) on the H200: OPT-13B / OPT-30B shapes, random bf16 weights,
the blocks in pinned host memory, the GPU capped to 16 GB (torch.cuda.set_per_process_memory_
fraction). LOZO's paired step (virtual + shadow, stochastic rounding: one forward of the batch
stacked twice, each block uploaded once a step), with the block tensors' update passes on the
host (C++ engine, update="host") and on the GPU (uploaded, written back, update="gpu").
Reports the step time against the floor max(block weights ÷ measured host-to-device
bandwidth, the paired forward's compute with the weights resident), the peak GPU memory, and
beside it the same model resident on the uncapped GPU. Verifies: the streamed forward's loss
equals the resident one's within bf16 rounding.

The paired forward's compute is measured on the GPU on a 2- and a 4-block model of the same
shape and extrapolated linearly to the full depth (the full model need not fit). The host
engine's flush of virtual mode's pending updates (once per nu steps, over every block weight)
is timed apart (flush_s), as settle() runs it.

Usage (GPU machine, repo root; the C++ extension built): python bench/probes/offload.py OUT.json
[--models opt-13b opt-30b] [--batch 4] [--steps 3] [--cap-gb 16] [--prefetch 1]
[--update host gpu] [--trace DIR]
Writes JSON rows {"model", "gpu_cap_gb", "step_s", "floor_s", "peak_gpu_gb", ...}: the
"offload" list of latest.json.
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH / "tools"), str(BENCH / "suites")]
from precision import describe, make_optimizer, run_meta  # noqa: E402
from test_steps import SEQ  # noqa: E402
from timing import wall_s  # noqa: E402
from trace_gaps import export, summarise  # noqa: E402

from zofast import offload, paired  # noqa: E402

SHAPES = {
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, ffn_dim=20480, num_attention_heads=40),
    "opt-30b": dict(hidden_size=7168, num_hidden_layers=48, ffn_dim=28672, num_attention_heads=56),
}
GB = 1e9
START = time.perf_counter()


def config(name: str, layers: int | None = None):
    from transformers import OPTConfig

    shape = dict(SHAPES[name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return OPTConfig(vocab_size=50272, max_position_embeddings=2048, **shape)


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {text}", flush=True)


def build(cfg, host_blocks: bool):
    """An OPTForCausalLM with random bf16 weights (std 0.02, filled on the GPU): the blocks in
    one host buffer (offload.stream registers it as pinned where it is: no copy, no
    power-of-two rounding of the caching host allocator) where host_blocks, else everything on
    the GPU."""
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(cfg).to(torch.bfloat16).eval()
    blocks = {id(p) for p in model.model.decoder.layers.parameters()}
    named = [(m, k, p) for m in model.modules() for k, p in m._parameters.items() if p is not None]
    host = None
    if host_blocks:
        total = sum(p.numel() for _, _, p in named if id(p) in blocks)
        host = torch.empty(total, dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    start, made = 0, {}
    for module, key, p in named:
        if id(p) in made:  # tied
            module._parameters[key] = made[id(p)]
            continue
        value = torch.randn(p.shape, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        if host is not None and id(p) in blocks:
            view = host[start : start + p.numel()].view(p.shape)
            view.copy_(value)
            start += p.numel()
            value = view
        made[id(p)] = module._parameters[key] = torch.nn.Parameter(value, requires_grad=True)
    for module in model.modules():
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = torch.zeros_like(b, device="cuda")
    return model


def batch(cfg, size: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (size, SEQ), device="cuda", generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def h2d_gbps(size_gb: float = 2.0) -> float:
    """Host-to-device bandwidth from pinned memory, GB/s (median of 5 copies)."""
    src = torch.empty(int(size_gb * GB) // 2, dtype=torch.bfloat16).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    return size_gb / wall_s(lambda: dst.copy_(src, non_blocking=True), 5)


def paired_forward_s(name: str, rows: int, calls: int) -> float:
    """The paired forward's compute at full depth, weights resident: 2 and 4 blocks measured,
    extrapolated linearly."""
    times = {}
    for layers in (2, 4):
        cfg = config(name, layers)
        model = build(cfg, host_blocks=False)
        data = batch(cfg, rows)
        with torch.no_grad():
            times[layers] = wall_s(lambda m=model, d=data: paired.losses(m, d), calls)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    per_block = (times[4] - times[2]) / 2
    return times[2] + (SHAPES[name]["num_hidden_layers"] - 2) * per_block


def train_row(model, data, steps: int, trace: Path | None = None) -> dict:
    """Median step time, peak GPU memory and virtual mode's flush time of LOZO paired; with
    `trace`, one more step's torch.profiler timeline written there (bench/tools/trace_gaps.py
    reads it: copies against kernels, where the GPU waits)."""
    opt = make_optimizer("lozo", model, 1e-7, paired=True, nu=10**6)  # flush timed apart
    closure = lambda: paired.losses(model, data)  # noqa: E731
    torch.cuda.reset_peak_memory_stats()
    step = wall_s(lambda: opt.step(closure), steps)
    if trace is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            opt.step(closure)
            torch.cuda.synchronize()
        progress(summarise(export(prof, trace), trace.name))
    peak = torch.cuda.max_memory_allocated() / GB
    progress(f"step {step:.3f} s, peak {peak:.1f} GB; settling (virtual mode's flush)")
    t0 = time.perf_counter()
    opt.settle()  # virtual mode's flush: W += A·V_Aᵀ on every weight (host engine for blocks)
    torch.cuda.synchronize()
    flush = time.perf_counter() - t0
    row = {**describe(opt), "step_s": step, "peak_gpu_gb": peak, "flush_s": flush}
    opt.detach()
    return row


def run(name: str, args) -> list[dict]:
    cfg = config(name)
    data = batch(cfg, args.batch)
    bandwidth = h2d_gbps()
    forward = paired_forward_s(name, args.batch, args.steps)
    progress(f"{name}: host-to-device {bandwidth:.1f} GB/s, paired forward {forward:.3f} s")
    total = torch.cuda.get_device_properties(0).total_memory
    model = build(cfg, host_blocks=True)
    block_bytes = sum(p.numel() * 2 for p in model.model.decoder.layers.parameters())
    floor = max(block_bytes / GB / bandwidth, forward)
    progress(f"{name}: built, blocks {block_bytes / GB:.1f} GB, floor {floor:.3f} s")
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * GB / total))
    rows, loss_streamed = [], None
    for update in args.update:
        streamed = offload.stream(model, device="cuda", prefetch=args.prefetch, update=update)
        if streamed.host_buffer.packed:  # a second copy of the weights: host memory
            raise SystemExit(f"{name}: the blocks were copied, not registered where built")
        if loss_streamed is None:  # the weights as built (the resident model's)
            with torch.no_grad():
                loss_streamed = float(model(**data).loss)
        trace = args.trace / f"offload-{name}-{update}.json.gz" if args.trace else None
        capped = train_row(model, data, args.steps, trace)
        writes = streamed.writes.writes if streamed.writes is not None else 0
        streamed.remove()
        rows.append({"update": update, "device_passes": writes, **capped})
        progress(f"{name} update={update}: {capped}")
    torch.cuda.set_per_process_memory_fraction(1.0)
    common = {
        "model": name,
        "batch": args.batch,
        "seq": SEQ,
        "h2d_gbps": bandwidth,
        "block_gb": block_bytes / GB,
        "paired_forward_s": forward,
        "floor_s": floor,
    }
    rows = [
        {
            **common,
            "gpu_cap_gb": args.cap_gb,
            "offload": True,
            **r,
            "step_over_floor": r["step_s"] / floor,
        }
        for r in rows
    ]
    del model, streamed
    gc.collect()
    torch.cuda.empty_cache()
    if block_bytes + 8 * GB < total:  # the same model resident, uncapped
        model = build(cfg, host_blocks=False)
        with torch.no_grad():
            loss_resident = float(model(**data).loss)
        if abs(loss_streamed - loss_resident) > 2e-2 * abs(loss_resident):
            raise SystemExit(f"{name}: streamed loss {loss_streamed} vs resident {loss_resident}")
        resident = train_row(model, data, args.steps)
        ratio = resident["step_s"] / floor
        rows.append(
            {**common, "gpu_cap_gb": None, "offload": False, **resident, "step_over_floor": ratio}
        )
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--models", nargs="+", default=["opt-13b", "opt-30b"], choices=SHAPES)
    parser.add_argument("--batch", type=int, default=4, help="sequences of 256 tokens")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after a warm-up)")
    parser.add_argument("--cap-gb", type=float, default=16.0, help="GPU memory cap, GB")
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--trace", type=Path, help="folder for one traced step per update mode")
    parser.add_argument(
        "--update", nargs="+", default=["host", "gpu"], choices=["host", "gpu"],
        help="where the block tensors' update passes run (each measured)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
    rows = [row for name in args.models for row in run(name, args)]
    payload = {**run_meta("cuda"), "method": "lozo paired (default mode)", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['model']} cap {r['gpu_cap_gb']} update {r.get('update', '-')}: "
            f"step {r['step_s']:.2f} s, floor "
            f"{r['floor_s']:.2f} s (×{r['step_over_floor']:.2f}), peak {r['peak_gpu_gb']:.1f} GB, "
            f"flush {r['flush_s']:.1f} s"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
