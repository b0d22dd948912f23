"""How far perturb / restore rounding moves bf16 weights when the update is nil: a 512×512 bf16
Linear trained 1000 steps with lr = 1e-30 (every update far below bf16 resolution), eps = 1e-3,
by LOZO in place, LOZO in virtual mode and MeZO; relative drift ‖W − W₀‖ / ‖W₀‖ after settle().

Usage: python bench/drift_bf16.py (CPU, about 10 s)."""

import torch

from zofast.optim import LOZO, MeZO


def main():
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    runs = [("LOZO in place", LOZO, "inplace"), ("LOZO virtual", LOZO, "virtual")]
    runs.append(("MeZO in place", MeZO, "inplace"))
    for name, cls, mode in runs:
        torch.manual_seed(0)
        model = torch.nn.Linear(512, 512, bias=False).to(torch.bfloat16)
        start = model.weight.detach().float().clone()
        extra = {"rank": 2, "nu": 50, "mode": mode} if cls is LOZO else {}
        opt = cls(model, lr=1e-30, eps=1e-3, seed=1, **extra)
        for _ in range(1000):
            opt.step(lambda model=model: model(x).float().pow(2).mean())
        opt.settle()
        if mode == "virtual":
            opt.detach()
        w = model.weight.detach().float()
        drift = ((w - start).norm() / start.norm()).item()
        changed = (w != start).float().mean().item()
        print(f"{name}: relative drift {drift:.2e}, {100 * changed:.1f} % of weights changed")


if __name__ == "__main__":
    main()
