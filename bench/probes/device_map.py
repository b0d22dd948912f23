"""A model split by a device map (H200): OPT-1.3B shape, random bf16 weights, the first half of
the decoder blocks (and the embeddings, the tied head) on cuda:0, the second half and the final
norm on the CPU (zofast.device_map.dispatch: CPU blocks computed by the CPU). LOZO's default
(virtual + shadow, stochastic rounding): step time beside two plain forwards, split and all on
the GPU. Verifies first: the split forward's loss is the all-GPU one within bf16 rounding, and
the optimizer runs one pass group per device.

Usage (GPU machine, repo root): python bench/probes/device_map.py OUT.json [--batch 2] [--steps 3]
[--model opt-125m] (the CPU half's passes run zofast's CPU engine: build the C++ extension there,
its pure-torch fallback is much slower; 1.3B did not finish in 120 s without it)
"""

import argparse
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH / "tools"), str(BENCH / "suites")]
from precision import describe, finish, make_optimizer, run_meta  # noqa: E402
from test_steps import OPT_SHAPES, SEQ, random_opt  # noqa: E402
from timing import wall_s  # noqa: E402

from zofast.device_map import dispatch  # noqa: E402


def measure(model, ids, steps: int) -> dict:
    @torch.no_grad()
    def closure():
        return model(input_ids=ids, labels=ids).loss

    forward = wall_s(closure, steps) * 1e3
    opt = make_optimizer("lozo", model, 1e-7)
    parts = {
        name: [str(g.slots[0].param.device) for g in part.passes.devices]
        for name, part in (("inplace", opt._inplace), ("shadow", opt._shadow))
        if part is not None and part.slots
    }
    step = wall_s(lambda: opt.step(closure), steps) * 1e3
    row = {
        **describe(opt),
        "virtual_tensors": len(opt.virtual_names),
        "pass_devices": parts,
        "forward_ms": forward,
        "step_ms": step,
        "step_over_two_forwards": step / (2 * forward),
    }
    finish(opt)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--batch", type=int, default=2, help="sequences of 256 tokens")
    parser.add_argument("--steps", type=int, default=3, help="timed calls (after a warm-up)")
    parser.add_argument("--model", default="opt-1.3b", choices=list(OPT_SHAPES))
    args = parser.parse_args()
    name = args.model
    model, ids = random_opt(name, args.batch)
    blocks = OPT_SHAPES[name]["num_hidden_layers"]
    on_gpu = blocks // 2

    @torch.no_grad()
    def loss():
        return float(model(input_ids=ids, labels=ids).loss)

    reference = loss()
    all_gpu = measure(model, ids, args.steps)
    split = {
        "model.decoder.embed_tokens": 0,
        "model.decoder.embed_positions": 0,
        "lm_head": 0,
        "model.decoder.final_layer_norm": "cpu",
    }
    for i in range(blocks):
        split[f"model.decoder.layers.{i}"] = 0 if i < on_gpu else "cpu"
    model = dispatch(model, split)
    devices = sorted({str(p.device) for p in model.parameters()})
    split_loss = loss()
    if abs(split_loss - reference) > 2e-2 * abs(reference):
        raise SystemExit(f"split forward loss {split_loss} vs all-GPU {reference}")
    split_row = measure(model, ids, args.steps)
    if sorted({d for ds in split_row["pass_devices"].values() for d in ds}) != devices:
        raise SystemExit(f"passes on {split_row['pass_devices']}, weights on {devices}")
    payload = {
        **run_meta("cuda"),
        "shape": name,
        "batch": args.batch,
        "seq": SEQ,
        "blocks_on_gpu": on_gpu,
        "blocks_on_cpu": blocks - on_gpu,
        "method": "lozo (default mode)",
        "loss_all_gpu": reference,
        "loss_split": split_loss,
        "all_gpu": all_gpu,
        "split": split_row,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    for label, row in (("all on cuda:0", all_gpu), ("half on the CPU", split_row)):
        print(
            f"{label}: forward {row['forward_ms']:.1f} ms, step {row['step_ms']:.1f} ms "
            f"(÷ 2 forwards {row['step_over_two_forwards']:.2f}), {row['mode']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
