"""Derivative-free optimisation: DFO-LoRA (CMA-ES and the Fireworks Algorithm on low-rank query
and key modules), its population-batched evaluator, and the Fireworks Algorithm itself."""

from zofast.dfo.arch import Architecture, LowRankHooks, Target, find_architecture
from zofast.dfo.fireworks import Fireworks
from zofast.dfo.lora import DEFAULT_ALPHA, DFOLoRA, DFOLoRAConfig, DFOResult
from zofast.dfo.population import PopulationEvaluator, clipped_std

__all__ = [
    "DEFAULT_ALPHA",
    "Architecture",
    "DFOLoRA",
    "DFOLoRAConfig",
    "DFOResult",
    "Fireworks",
    "LowRankHooks",
    "PopulationEvaluator",
    "Target",
    "clipped_std",
    "find_architecture",
]
