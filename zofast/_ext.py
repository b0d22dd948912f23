"""Loads the compiled extension zofast._C (torch.ops.zofast.*), or says why it cannot."""

import warnings

import torch

try:
    from zofast import _C

    EXTENSION_ERROR = None
except ImportError as error:  # the documented fallback: pure torch, same contract, slower
    _C = None
    EXTENSION_ERROR = (
        f"zofast's compiled extension (zofast._C) could not be loaded: {error}. Rebuild it against "
        "the torch you run with: `pip install --no-build-isolation --force-reinstall .` in the "
        "zofast source folder (needs a C++ compiler; nvcc too for the CUDA ops). Until then "
        "backend='auto' uses the pure-torch reference: the same integers and uniforms, normals "
        "within a few ULP, much slower."
    )

_warned = False


def has_extension(device: torch.device) -> bool:
    """Whether the extension's ops run on `device` (CPU always; CUDA if built with nvcc)."""
    if _C is None:
        return False
    return device.type == "cpu" or (device.type == "cuda" and bool(_C.has_cuda))


def require_extension(device: torch.device):
    """torch.ops.zofast, or a RuntimeError saying what to do."""
    if _C is None:
        raise RuntimeError(EXTENSION_ERROR)
    if not has_extension(device):
        raise RuntimeError(
            f"zofast._C was built without {device.type} support; rebuild on a machine whose "
            "torch has CUDA and where nvcc is on PATH: "
            "`pip install --no-build-isolation --force-reinstall .`"
        )
    return torch.ops.zofast


def warn_fallback():
    """Warn once that the slow pure-torch path stands in for the extension."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(EXTENSION_ERROR, RuntimeWarning, stacklevel=3)


BACKENDS = ("auto", "triton", "cpp", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on `device`: "auto" is Triton for CUDA tensors and the C++
    extension for CPU tensors (each falling back as documented); others are checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if has_extension(device):
            return "cpp"
        warn_fallback()
        return "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install triton")
    if backend == "cpp":
        require_extension(device)
    return backend


def triton_available() -> bool:
    """Whether triton can be imported (zofast.kernels then holds real Triton kernels)."""
    from zofast.kernels._triton import HAS_TRITON

    return HAS_TRITON
