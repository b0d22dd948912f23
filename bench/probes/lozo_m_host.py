"""Python-level engine calls per LOZO-M step: what is still per tensor on the host.

Counts, over a few steps after a warm-up, the calls of zofast.perturb's ops (wherever a module
imported them), of the graphed / multi-tensor passes and of Momentum's per-tensor methods, for
LOZO-M in its default mode on a tiny OPT (bf16 on a GPU, float32 and bf16 on a CPU), and prints
them per step as JSON (also written to OUT/lozo_m_host.json).

Usage (repo root): python3 -P bench/probes/lozo_m_host.py OUT [steps]
"""

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import transformers

import zofast
from zofast import perturb
from zofast.graphed import GraphedPass
from zofast.optim.momentum import Momentum
from zofast.optim.momentum_update import ColumnsPass

ENGINE = ("gaussian_", "lowrank_", "outer_add_", "gaussian_noise", "lowrank_factors")
METHODS = [
    (GraphedPass, "replay_table"),
    (ColumnsPass, "run"),
    (Momentum, "_step"),
    (Momentum, "apply"),
]


def counting(counts: Counter):
    """Wrap the engine ops in every zofast module that holds them, and METHODS; returns undo."""
    undo = []
    for name in ENGINE:
        original = getattr(perturb, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        for module in [m for k, m in sys.modules.items() if k.startswith("zofast") and m]:
            if getattr(module, name, None) is original:
                setattr(module, name, wrapped)
                undo.append((module, name, original))
    for cls, name in METHODS:
        original = getattr(cls, name)

        def method(self, *args, _original=original, _key=f"{cls.__name__}.{name}", **kwargs):
            counts[_key] += 1
            return _original(self, *args, **kwargs)

        setattr(cls, name, method)
        undo.append((cls, name, original))
    return lambda: [setattr(owner, name, value) for owner, name, value in reversed(undo)]


def tiny_opt(dtype, device):
    config = transformers.OPTConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        ffn_dim=256,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
    )
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(config).to(device, dtype).eval()


def probe(dtype, device, steps: int) -> dict:
    model = tiny_opt(dtype, device)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0)).to(device)
    opt = zofast.LOZO(model, lr=1e-4, rank=2, momentum=0.9, seed=1)

    def closure():
        return model(input_ids=ids, labels=ids).loss

    for _ in range(3):  # warm-up: graphs captured, flat buffers built, first-step momentum
        opt.step(closure)
    counts: Counter = Counter()
    undo = counting(counts)
    try:
        for _ in range(steps):
            opt.step(closure)
    finally:
        undo()
    tensors = sum(p.requires_grad for p in model.parameters())
    vectors = sum(p.requires_grad and p.dim() == 1 for p in model.parameters())
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "mode": opt.mode,
        "exact": opt.exact,
        "trained_tensors": tensors,
        "vectors_1d": vectors,
        "per_step": {k: v / steps for k, v in sorted(counts.items())},
    }


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "lozo_m_host")
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    if torch.cuda.is_available():
        runs = [(torch.bfloat16, "cuda")]
    else:
        runs = [(torch.float32, "cpu"), (torch.bfloat16, "cpu")]
    rows = [probe(dtype, device, steps) for dtype, device in runs]
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"torch": torch.__version__, "rows": rows}, indent=1)
    (out / "lozo_m_host.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
