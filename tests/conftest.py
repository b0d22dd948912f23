"""Shared test setup. Triton's interpreter must be on before triton is first imported when there is
no GPU (zofast.kernels does the same); tests that need a GPU are marked `gpu` and skipped here.

``ZOFAST_HIDE_MODULES="triton zofast._C"`` runs the suite as on a machine where those modules are
not installed: importing them (or anything below them) raises ModuleNotFoundError, as it would
there. Tests that need a hidden module are marked `triton` / `extension` and skipped (CI's
fallback step, .ci/run).
"""

import importlib.abc
import os
import secrets
import sys

import pytest
import torch
from helpers_backends import HIDDEN


class _Hide(importlib.abc.MetaPathFinder):
    """Refuses to find the hidden modules, so `import` fails as if they were not installed."""

    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == name or fullname.startswith(name + ".") for name in HIDDEN):
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by the tests)")
        return None


if HIDDEN:
    loaded = [m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in HIDDEN)]
    if loaded:
        raise RuntimeError(f"ZOFAST_HIDE_MODULES: {loaded} were imported before the tests began")
    sys.meta_path.insert(0, _Hide())

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# After the hiding and the interpreter switch: it imports transformers, which may import triton.
from helpers_models import make_tiny_model  # noqa: E402

_NEEDS = {"triton": "triton", "extension": "zofast._C"}
# Modules that import triton themselves (their kernels are the subject of every test in them).
collect_ignore = ["test_rounding.py", "test_stochastic_rounding.py"] if "triton" in HIDDEN else []


def pytest_collection_modifyitems(config, items):
    skips = {
        marker: pytest.mark.skip(reason=f"{module} is hidden (ZOFAST_HIDE_MODULES)")
        for marker, module in _NEEDS.items()
        if module in HIDDEN
    }
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def fresh_seed():
    """A new random seed per test run (printed on failure through the assertion messages)."""
    return secrets.randbits(63)


class _TinyModelDirs(dict):
    """arch → folder of ``make_tiny_model(arch)``, each written the first time it is asked for."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, arch: str):
        path = self[arch] = make_tiny_model(arch, self.root / arch)
        return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """The tiny model folders (``helpers_models.TINY_ARCHS``), shared by every test module.

    Tests only read them (test_cli checks that a run leaves its folder byte for byte as it was)."""
    return _TinyModelDirs(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def kshot(tmp_path_factory):
    """An LM-BFF style SST-2 folder (16-13, 16-21) made of the demo set's sentences (the grid's
    tests)."""
    from zofast.data import load_demo

    root = tmp_path_factory.mktemp("k-shot")
    demo = load_demo()
    for seed in (13, 21):
        folder = root / "SST-2" / f"16-{seed}"
        folder.mkdir(parents=True)
        for split, n in (("train", 8), ("dev", 8), ("test", 12)):
            rows = [f"{ex.text_a}\t{ex.label}" for ex in demo[split][:n]]
            (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP contention on a busy 2-core CI box.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
