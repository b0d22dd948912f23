"""Data-parallel LOZO on N GPUs (issue 12): every rank steps on its own 16×256 shard of the
batch, one all-reduce of (L+, L−, n) per step, weights bit-identical across ranks.

OPT-6.7B shape, random bf16 weights (seeded: the same on every rank), LOZO (rank 2, ν = 50) in
place (pipelined) and in its default exact mode ("auto": virtual with a shadow rest for bf16).
Per mode: --hash-steps steps, then every rank's weight hash (they must all agree), then the
timed steps (median of --runs runs of --steps back-to-back steps, the slowest rank's), the
peak memory of a step ÷ a plain forward's, and the collectives' bytes per step counted.
One row per mode; examples_per_s = gpus × batch ÷ step_s; efficiency is left to merge.py
(examples/s ÷ (gpus × the 1-GPU run's)).

Usage (repo root; bench/multi_gpu/run.sh runs it on 1, 2 and 4 GPUs):
    torchrun --standalone --nproc-per-node 4 bench/multi_gpu/dp.py --out OUT
Dry run on the CPU (gloo, tiny shape, 2 processes):
    torchrun --standalone --nproc-per-node 2 bench/multi_gpu/dp.py --out OUT \\
        --backend gloo --device cpu --model tiny --batch 2 --seq 16 --steps 2 --runs 1
Writes OUT/dp-<N>gpu.json.
"""

import torch
import torch.distributed as dist
from common import (
    build,
    bytes_per_step,
    finish,
    hash_check,
    lozo,
    parse,
    parser,
    peak_bytes,
    peak_over,
    process_group,
    row,
    seconds,
    token_ids,
    write,
)

MODES = ("inplace", "auto")


def main(argv=None) -> None:
    p = parser(__doc__, model="opt-6.7b", steps=5)
    p.add_argument("--hash-steps", type=int, default=100, help="steps before the hash check")
    args = parse(p, argv)
    with process_group(args) as (device, counted):
        gpus, rank = dist.get_world_size(), dist.get_rank()
        model = build(args.model, device)
        ids = token_ids(model.config, args, device, seed=rank)

        @torch.no_grad()
        def closure():
            return model(input_ids=ids, labels=ids).loss

        forward_peak = peak_bytes(closure, device)
        rows, checks = [], {}
        for mode in MODES:
            opt = lozo(model, mode, dist.group.WORLD)

            def step(opt=opt):
                opt.step(closure, examples=args.batch)

            for _ in range(args.hash_steps):
                step()
            opt.settle()
            checks[f"hash {opt.mode}"] = hash_check(model, args.hash_steps)
            step_s = seconds(step, device, args.steps, args.runs)
            peak = peak_over(peak_bytes(step, device), forward_peak, device)
            nbytes = bytes_per_step(counted, step, device)
            rows.append(
                row(
                    "dp",
                    gpus,
                    args.model,
                    opt.mode,
                    step_s,
                    gpus * args.batch / step_s,
                    peak,
                    nbytes,
                )
            )
            finish(opt)
        write(args, "dp", rows, checks)


if __name__ == "__main__":
    main()
