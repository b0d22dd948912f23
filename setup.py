"""Builds zofast and its extension, zofast._C.

The extension is a CppExtension on a CPU-only torch and a CUDAExtension when torch was built with
CUDA and nvcc is found. Build it against the torch you run with:
`pip install --no-build-isolation .` (an isolated build would compile against another torch
wheel than the one installed).
Set ZOFAST_NO_EXTENSION=1 to install without it (zofast then uses its pure-torch fallback).
"""

import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("ZOFAST_NO_EXTENSION") != "1":
    import torch
    from torch.utils import cpp_extension

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    sources = ["csrc/zofast_cpu.cpp"]
    # -fopenmp: at::parallel_for in the C++ ops runs serially without it (measured in
    # bench/results/cpu-2026-11-22: 1 and 2 threads took the same time).
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp", f"-DZOFAST_WITH_CUDA={int(with_cuda)}"]
    link_flags = ["-fopenmp"]
    if with_cuda:
        sources.append("csrc/zofast_cuda.cu")
        # Normals bit-identical to Triton's need exactly these (FACTS §1): no fast math, ever.
        nvcc_flags = ["-O3", "-ftz=true", "-prec-sqrt=false", "-prec-div=true"]
        extension = cpp_extension.CUDAExtension(
            "zofast._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        extension = cpp_extension.CppExtension(
            "zofast._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    ext_modules = [extension]
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

setup(
    packages=[
        "zofast",
        "zofast.dfo",
        "zofast.dfo.lora",
        "zofast.grid",
        "zofast.kernels",
        "zofast.optim",
        "zofast.train",
    ],
    package_dir={"zofast.kernels": "kernels"},
    package_data={"zofast": ["demo_data/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
