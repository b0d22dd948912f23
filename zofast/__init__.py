"""zofast: zeroth-order and derivative-free fine-tuning at the speed and memory of inference.

The engine (zofast.rng, zofast.perturb) adds seeded Gaussian perturbations to weights in place,
low-rank (U·Vᵀ) or full-rank, as a pure function of (seed, element index). zofast.paired makes
the closures of paired steps (LOZO(..., paired=True): both losses from one forward).
zofast.offload streams the blocks of a model larger than GPU memory from host memory.
"""

from zofast import offload, paired, perturb, rng
from zofast.optim import LOZO, MeZO
from zofast.perturb import gaussian_, gaussian_noise, lowrank_, lowrank_factors, outer_add_
from zofast.replay import replay
from zofast.rng import RunSeeds
from zofast.trajectory import Trajectory

__version__ = "0.1.0"

__all__ = [
    "LOZO",
    "MeZO",
    "RunSeeds",
    "Trajectory",
    "gaussian_",
    "gaussian_noise",
    "lowrank_",
    "lowrank_factors",
    "offload",
    "outer_add_",
    "paired",
    "perturb",
    "replay",
    "rng",
]
