"""Which engine backends the CPU tests run: each one that is installed, as .ci/run installs them.

``ZOFAST_HIDE_MODULES`` (tests/conftest.py) hides triton and / or zofast._C; their backends then
leave the lists. Nothing else removes a backend: a missing extension or an interpreter that is
not on fails the tests instead of skipping them.
"""

import os

import torch

HIDDEN = tuple(os.environ.get("ZOFAST_HIDE_MODULES", "").split())
HAS_TRITON = "triton" not in HIDDEN
HAS_EXTENSION = "zofast._C" not in HIDDEN
# Triton runs CPU tensors only under its interpreter (a GPU machine checks it in test_gpu.py).
TRITON_ON_CPU = HAS_TRITON and not torch.cuda.is_available()
CPU_BACKENDS = [
    b
    for b, present in (("cpp", HAS_EXTENSION), ("triton", TRITON_ON_CPU), ("torch", True))
    if present
]
