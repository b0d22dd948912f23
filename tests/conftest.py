"""Shared test setup. Triton's interpreter must be on before triton is first imported when there is
no GPU (zofast.kernels does the same); tests that need a GPU are marked `gpu` and skipped here."""

import os
import secrets

import pytest
import torch
from helpers_models import make_tiny_model

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP contention on a busy 2-core CI box.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
