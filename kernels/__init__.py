"""Triton kernels of zofast (installed as zofast.kernels): one file per operation, each with its
launcher and a pure-torch reference of the same maths.

Triton compiles for GPUs only; on a machine where torch sees no CUDA device this package turns on
Triton's interpreter (TRITON_INTERPRET=1) before any kernel is defined, so that backend="triton"
runs the very same kernel code on CPU tensors (that is how CI tests the kernels).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
