"""Derivative-free optimisation: the Fireworks Algorithm and DFO-LoRA."""

from zofast.dfo.fireworks import Fireworks

__all__ = ["Fireworks"]
