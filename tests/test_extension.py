"""The compiled extension: loaded here, and the documented behaviour when it is not."""

import pytest
import torch

from zofast import _ext, perturb


@pytest.mark.extension
def test_extension_is_loaded_with_its_operators():
    assert _ext.EXTENSION_ERROR is None, _ext.EXTENSION_ERROR
    assert hasattr(torch.ops.zofast, "gaussian_")
    assert _ext.resolve_backend("auto", torch.device("cpu")) == "cpp"


def test_without_extension_auto_falls_back_to_torch_with_a_warning(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "EXTENSION_ERROR", "zofast._C could not be loaded: test. Rebuild...")
    monkeypatch.setattr(_ext, "_warned", False)
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        assert _ext.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="Rebuild"):
        perturb.gaussian_(torch.zeros(3), 1, 1.0, backend="cpp")
    w = perturb.gaussian_(torch.zeros(8), 1, 1.0)
    assert torch.equal(w, perturb.gaussian_noise((8,), 1, backend="torch"))


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` now fails as where it is not installed
import torch
import zofast
from zofast import _ext, perturb
from zofast.kernels import gaussian, lowrank, multi, philox

assert not _ext.triton_available() and not philox.triton_interpreting()
w = torch.zeros(8, 6)
perturb.lowrank_(w, 1, 2, 2, 1e-3, backend="torch")
perturb.gaussian_(w, 3, 1e-3, backend="torch")
try:
    philox.noise_triton(torch.empty(4), torch.zeros(1, dtype=torch.int64), torch.ones(1), 0)
except ImportError as error:
    assert "pip install triton" in str(error), error
else:
    raise AssertionError("a Triton kernel ran without triton")
try:
    perturb.gaussian_(w, 3, 1e-3, backend="triton")
except RuntimeError as error:
    assert "needs the triton package" in str(error), error
print("ok", float(w.abs().sum()) > 0)
"""


def test_zofast_imports_and_runs_its_references_without_triton():
    """The kernel modules hold the pure-torch references: they import and run without triton
    (CI also runs the core tests so: make test-fallback)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-P", "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok True", done.stderr[-2000:]
