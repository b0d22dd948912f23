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
