"""Probe: can the weight passes of a ZO step run beside the forwards on a second stream?
OPT-shaped random model, bf16, batch 16x256. Prints JSON lines; usage: python overlap.py NAME."""

import json
import sys

import numpy as np
import torch
from transformers import OPTConfig, OPTForCausalLM

from zofast.graphed import GraphedPass

SHAPES = {
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32),
}
name = sys.argv[1]
config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, **SHAPES[name])
with torch.device("cuda"):
    model = OPTForCausalLM(config).to(torch.bfloat16).eval()
ids = torch.randint(0, config.vocab_size, (16, 256), device="cuda")


@torch.no_grad()
def fwd():
    return model(input_ids=ids, labels=ids).loss


dec = model.model.decoder
# (params, modules whose pre-hook waits for the group, module whose post-hook releases it)
groups = [
    (
        [dec.embed_tokens.weight, dec.embed_positions.weight],
        [dec.embed_tokens, dec.embed_positions],
        model.lm_head,
    )
]
for layer in dec.layers:
    groups.append((list(layer.parameters()), [layer], layer))
groups.append(
    (list(dec.final_layer_norm.parameters()), [dec.final_layer_norm], dec.final_layer_norm)
)
assert sum(p.numel() for g in groups for p in g[0]) == sum(p.numel() for p in model.parameters())
rng = np.random.default_rng(0)


def table(count, scales):
    seeds = rng.integers(0, 2**63, size=(count, len(scales) + 1), dtype=np.uint64)
    return seeds, np.tile(np.array(scales, np.float32), (count, 1))


A_SCALES, B_SCALES = [-2e-3], [1e-3, -1e-7, 1e-3]


def run(method, mode, side_priority, steps=8):
    rank = 2 if method == "lozo" else 0
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream(priority=side_priority)
    if mode == "serial":
        params = [p for g in groups for p in g[0]]
        ranks = [rank if p.dim() == 2 else 0 for p in params]
        a = GraphedPass(params, ranks, 1)
        b = GraphedPass(params, ranks, 3, share_with=a)

        def step():
            l1 = fwd()
            a.replay_table(*table(len(params), A_SCALES))
            l2 = fwd()
            (l1 - l2).item()
            b.replay_table(*table(len(params), B_SCALES))

        handles = []
    else:
        passes = []
        for params, _, _ in groups:
            ranks = [rank if p.dim() == 2 else 0 for p in params]
            a = GraphedPass(params, ranks, 1)
            passes.append((a, GraphedPass(params, ranks, 3, share_with=a), len(params)))
        ready = [torch.cuda.Event() for _ in groups]
        state = {"phase": None}
        handles = []
        for i, (_, enter, leave) in enumerate(groups):
            for module in enter:
                handles.append(
                    module.register_forward_pre_hook(
                        lambda *_, i=i: torch.cuda.current_stream().wait_event(ready[i])
                    )
                )

            def release(*_, i=i):
                if state["phase"] != "A":
                    return
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    passes[i][0].replay_table(*table(passes[i][2], A_SCALES))
                    ready[i].record()

            handles.append(leave.register_forward_hook(release))

        def step():
            state["phase"] = "A"
            l1 = fwd()
            state["phase"] = None
            l2 = fwd()
            (l1 - l2).item()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for i, (_, b, count) in enumerate(passes):
                    b.replay_table(*table(count, B_SCALES))
                    ready[i].record()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        main.wait_stream(side)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    for h in handles:
        h.remove()
    return sorted(times)[1]


def two_forwards(steps=8):
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fwd()
            fwd()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return sorted(times)[1]


fwd()
torch.cuda.synchronize()
base = two_forwards()
print(json.dumps({"model": name, "two_forwards_ms": base}), flush=True)
for method in ["lozo", "mezo"]:
    for mode, prio in [("serial", 0), ("overlap", 0), ("overlap", -1)]:
        ms = run(method, mode, prio)
        print(
            json.dumps(
                {
                    "model": name,
                    "method": method,
                    "mode": mode,
                    "side_priority": prio,
                    "step_ms": ms,
                    "step_over_two_forwards": ms / base,
                }
            ),
            flush=True,
        )
print(json.dumps({"model": name, "two_forwards_ms_after": two_forwards()}), flush=True)
