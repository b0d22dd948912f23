"""Every docstring example of the installed zofast package runs and gives the output it shows.

Examples may use ``torch`` and zofast's public names (``zofast.__all__``) without importing them.
Each runs in a fresh temporary folder (files an example writes go there). Lines that need what CI
does not have (network, a GPU, the LM-BFF data, a finished run's files) carry
``# doctest: +SKIP`` and say why; examples that take more than a few seconds are marked slow.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import zofast

# Modules that are not imported here: the console entry's __main__ guard is all they add.
SKIP_MODULES = ()
SLOW = {}


def _examples() -> list:
    names = ["zofast"] + [
        m.name for m in pkgutil.walk_packages(zofast.__path__, "zofast.") if m.name != "zofast._C"
    ]
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for name in sorted(names):
        if name in SKIP_MODULES:
            continue
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            if test.examples and test.name not in {t.name for t in found}:
                found.append(test)
    return found


EXAMPLES = _examples()


@pytest.mark.parametrize(
    "test",
    [
        pytest.param(t, id=t.name, marks=[pytest.mark.slow] if t.name in SLOW else [])
        for t in EXAMPLES
    ],
)
def test_docstring_example(test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    test.globs = {
        "torch": torch,
        **{name: getattr(zofast, name) for name in zofast.__all__},
        **test.globs,
    }
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    lines = []
    runner.run(test, out=lines.append)
    failed = runner.summarize(verbose=False).failed
    assert failed == 0, "".join(lines)
