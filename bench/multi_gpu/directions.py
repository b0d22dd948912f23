"""Direction-parallel LOZO on N GPUs (issue 12): q = 4 directions per step shared among the
ranks (split="directions"), each rank evaluating its own on the whole batch, against the same
q = 4 on one GPU (this script with N = 1).

OPT-6.7B shape, random bf16 weights (seeded), batch 16×256 on every rank, LOZO (rank 2,
ν = 50) in its default exact mode (split="directions" needs one). Checks first that the ranks'
iterates equal one process evaluating all q directions alone (trajectories and weight hashes
after --verify-steps steps, bit for bit), then times steps (median of --runs runs of --steps
back-to-back steps, the slowest rank's), the peak memory of a step ÷ a plain forward's, the
collectives' bytes per step, and every rank's weight hash after all its steps.
examples_per_s = batch ÷ step_s (every rank takes the whole batch); efficiency is left to
merge.py (the 1-GPU run's step_s ÷ (gpus × step_s): the speed-up ÷ gpus).

Usage (repo root; bench/multi_gpu/run.sh runs it on 1, 2 and 4 GPUs):
    torchrun --standalone --nproc-per-node 4 bench/multi_gpu/directions.py --out OUT
Dry run on the CPU (gloo, tiny shape, 2 processes):
    torchrun --standalone --nproc-per-node 2 bench/multi_gpu/directions.py --out OUT \\
        --backend gloo --device cpu --model tiny --batch 2 --seq 16 --steps 2 --runs 1
Writes OUT/directions-<N>gpu.json.
"""

import os

import torch
import torch.distributed as dist
from common import (
    build,
    bytes_per_step,
    everywhere,
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
    weights_digest,
    write,
)


def shared(args, device, group):
    """(model, its optimizer, closure): the q directions shared among the ranks of `group`, or
    all evaluated by this process (group None)."""
    model = build(args.model, device)
    ids = token_ids(model.config, args, device, seed=0)  # the whole batch on every rank

    @torch.no_grad()
    def closure():
        return model(input_ids=ids, labels=ids).loss

    split = "directions" if group is not None else "batch"
    opt = lozo(model, "auto", group, directions=args.directions, split=split)
    return model, opt, closure


def same_as_one_process(args, device) -> bool:
    """Whether --verify-steps steps shared among the ranks give one process's trajectory and
    weights, bit for bit, on every rank."""
    runs = []
    for group in (dist.group.WORLD, None):
        model, opt, closure = shared(args, device, group)
        for _ in range(args.verify_steps):
            opt.step(closure)
        finish(opt)
        runs.append((opt.trajectory, weights_digest(model)))
        del model, opt, closure  # the closure holds the model too
    return everywhere(runs[0] == runs[1], device)


def main(argv=None) -> None:
    p = parser(__doc__, model="opt-6.7b", steps=5)
    p.add_argument("--directions", type=int, default=4, help="q, directions per step")
    p.add_argument("--verify-steps", type=int, default=3, help="steps against one process")
    args = parse(p, argv)
    gpus = int(os.environ["WORLD_SIZE"])
    if args.directions < gpus:
        p.error(f"--directions {args.directions} < {gpus} processes: each rank needs one")
    with process_group(args) as (device, counted):
        checks = {"same iterates as one process": same_as_one_process(args, device)}
        model, opt, closure = shared(args, device, dist.group.WORLD)
        forward_peak = peak_bytes(closure, device)

        def step():
            opt.step(closure)

        step_s = seconds(step, device, args.steps, args.runs)
        peak = peak_over(peak_bytes(step, device), forward_peak, device)
        nbytes = bytes_per_step(counted, step, device)
        finish(opt)
        checks["hash"] = hash_check(model, opt.trajectory.steps)
        mode = f"{opt.mode} q={args.directions}"
        rows = [
            row("directions", gpus, args.model, mode, step_s, args.batch / step_s, peak, nbytes)
        ]
        write(args, "directions", rows, checks)


if __name__ == "__main__":
    main()
