"""FSDP2-sharded LOZO on N GPUs (issue 12): the OPT-66B shape (132 GB of bf16 weights, more than
one H200 holds for inference with headroom) sharded over 2 or 4 GPUs, each rank stepping on
its own 16×256 shard of the batch.

The model is built on the meta device, sharded (``fully_shard`` per decoder block and on the
root) and then materialised shard by shard (``to_empty``; seeded random values per rank): no
process ever holds the whole model. Shards are float32 under FSDP2's mixed precision (bf16
forwards: the documented setup) where they fit in 60 % of a GPU's memory, else bf16 (in place,
rounding drift accepted for timing); --shards forces one; a model that fits in neither is
refused before anything is built. LOZO (rank 2, ν = 50) in place, pipelined.

Checks first, on the smaller --check-model shape, that the first perturbation (+εZ) of every
rank's shards equals the same rows of the unsharded model's perturbation bit for bit (float32
and bf16 shards). Then times forwards (each followed by a reshard, so each gathers its shards
as a step's do) and steps (median of --runs runs of --steps back-to-back calls, the slowest
rank's), the peak memory of a step ÷ its forward's (the largest over the GPUs), and the
collectives' bytes per step (FSDP2's all-gathers and zofast's all-reduce). examples_per_s =
gpus × batch ÷ step_s; efficiency = two forwards ÷ step (the reciprocal of step ÷ two forwards
of the same sharded model; 1 would be a step that costs only its forwards).

Usage (repo root; bench/multi_gpu/run.sh runs it on 2 and 4 GPUs):
    torchrun --standalone --nproc-per-node 4 bench/multi_gpu/fsdp.py --out OUT
Dry run on the CPU (gloo, tiny shapes, 2 processes):
    torchrun --standalone --nproc-per-node 2 bench/multi_gpu/fsdp.py --out OUT \\
        --backend gloo --device cpu --model tiny --check-model tiny --batch 2 --seq 16 \\
        --steps 2 --runs 1
Writes OUT/fsdp-<N>gpu-<shard dtype>.json.
"""

import copy
import os

import torch
import torch.distributed as dist
from common import (
    SHAPES,
    build,
    bytes_per_step,
    everywhere,
    finish,
    lozo,
    opt_config,
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

SHARDS = ("auto", "float32", "bfloat16")
HEADROOM = 0.6  # of a GPU's memory for shards: the rest for gathered blocks, activations, logits


def count_params(name: str) -> int:
    """Parameters of the shape (tied ones once), counted on the meta device."""
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in OPTForCausalLM(opt_config(name)).parameters())


def shard_dtype(choice: str, params: int, gpus: int, memory: int | None) -> str:
    """The shards' dtype: `choice`, or under "auto" float32 where it fits, else bfloat16.
    `memory`: bytes of one GPU (None on the CPU: everything fits). ValueError if none fits."""
    options = ("float32", "bfloat16") if choice == "auto" else (choice,)
    for name in options:
        per_gpu = params * getattr(torch, name).itemsize / gpus
        if memory is None or per_gpu <= HEADROOM * memory:
            return name
    raise ValueError(
        f"{params / 1e9:.1f}B parameters in {name} take {per_gpu / 1e9:.0f} GB per GPU on "
        f"{gpus} GPUs, over {HEADROOM:.0%} of a GPU's {memory / 1e9:.0f} GB: use more GPUs"
    )


def shard(model, mesh, dtype):
    """fully_shard per decoder block and on the root; float32 shards compute in bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    compute = torch.bfloat16 if dtype == torch.float32 else None
    options = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=compute)}
    for block in model.model.decoder.layers:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


@torch.no_grad()
def sharded_model(name: str, dtype, device, mesh):
    """The model built on meta, sharded, then only this rank's shards allocated and filled
    (OPT's init: normal(0, 0.02) matrices, zero biases, unit norm weights)."""
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(opt_config(name)).to(dtype).eval()
    shard(model, mesh, dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    for pname, p in model.named_parameters():
        local = p.to_local()
        if pname.endswith("bias"):
            local.zero_()
        elif local.dim() == 1:
            local.fill_(1.0)
        else:
            local.normal_(0.0, 0.02, generator=gen)
    return model


def first_perturbation(model, group, ids) -> list[tuple[torch.Tensor, int]]:
    """(this rank's part, its first row) of every parameter at the first forward of a step."""
    from zofast.optim.sharding import local_shard

    seen = []

    @torch.no_grad()
    def closure():
        if not seen:
            seen.extend(
                (t.detach().clone(), r0) for t, r0, _ in map(local_shard, model.parameters())
            )
        return model(input_ids=ids, labels=ids).loss

    opt = lozo(model, "inplace", group)
    opt.step(closure)
    finish(opt)
    return seen


def noise_check(args, device, mesh) -> dict:
    """Whether every rank's perturbed shards equal the same rows of the unsharded model's,
    bit for bit, with float32 and with bf16 shards (and the perturbation moved them)."""
    result = {"model": args.check_model}
    ids = token_ids(opt_config(args.check_model), args, device, seed=0)
    for dtype in (torch.float32, torch.bfloat16):
        plain = build(args.check_model, device, dtype)
        start = [p.detach().clone() for p in plain.parameters()]
        sharded = shard(copy.deepcopy(plain), mesh, dtype)
        mine = first_perturbation(sharded, dist.group.WORLD, ids)
        whole = first_perturbation(plain, None, ids)
        same = all(
            torch.equal(part, full[r0 : r0 + len(part)])
            for (part, r0), (full, _) in zip(mine, whole, strict=True)
        )
        moved = not all(torch.equal(a, b) for (a, _), b in zip(whole, start, strict=True))
        result[str(dtype).removeprefix("torch.")] = everywhere(same and moved, device)
        del plain, sharded, start, mine, whole
    return result


def main(argv=None) -> None:
    p = parser(__doc__, model="opt-66b", steps=3)
    p.add_argument("--check-model", choices=list(SHAPES), default="opt-1.3b")
    p.add_argument("--shards", choices=SHARDS, default="auto", help="the shards' dtype")
    args = parse(p, argv)
    gpus = int(os.environ["WORLD_SIZE"])
    memory = None
    if args.device == "cuda":
        memory = torch.cuda.get_device_properties(int(os.environ["LOCAL_RANK"])).total_memory
    try:
        dtype_name = shard_dtype(args.shards, count_params(args.model), gpus, memory)
    except ValueError as error:
        p.error(str(error))
    dtype = getattr(torch, dtype_name)
    from torch.distributed.device_mesh import init_device_mesh

    with process_group(args) as (device, counted):
        mesh = init_device_mesh(device.type, (gpus,))
        checks = {"noise equals unsharded": noise_check(args, device, mesh)}
        model = sharded_model(args.model, dtype, device, mesh)
        ids = token_ids(model.config, args, device, seed=dist.get_rank())

        @torch.no_grad()
        def closure():
            return model(input_ids=ids, labels=ids).loss

        def forward():  # as in a step: the next forward gathers the shards again
            closure()
            model.reshard()

        forward_s = seconds(forward, device, args.steps, args.runs)
        forward_peak = peak_bytes(forward, device)
        opt = lozo(model, "inplace", dist.group.WORLD)

        def step():
            opt.step(closure, examples=args.batch)

        step_s = seconds(step, device, args.steps, args.runs)
        peak = peak_over(peak_bytes(step, device), forward_peak, device)
        nbytes = bytes_per_step(counted, step, device)
        finish(opt)
        compute = ", bf16 compute" if dtype == torch.float32 else ""
        mode = f"{opt.mode}, {dtype_name} shards{compute}"
        examples = gpus * args.batch / step_s
        rows = [
            row(
                "fsdp",
                gpus,
                args.model,
                mode,
                step_s,
                examples,
                peak,
                nbytes,
                2 * forward_s / step_s,
            )
        ]
        write(args, "fsdp", rows, checks, name=f"fsdp-{gpus}gpu-{dtype_name}")


if __name__ == "__main__":
    main()
