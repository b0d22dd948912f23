"""The few-shot accuracy grid on one GPU (issue 15): protocol, lr selection, runner, report.

Modules, one mechanism each: :mod:`~zofast.grid.protocol` (variants, cells, budgets, lr grids),
:mod:`~zofast.grid.selection` (the lr chosen on dev), :mod:`~zofast.grid.records` (one JSON
line per finished run), :mod:`~zofast.grid.runner` (worker processes, deadline, resume),
:mod:`~zofast.grid.stats` (mean ± std, t intervals), :mod:`~zofast.grid.report`
(docs/results.md and docs/results.json) and :mod:`~zofast.grid.plots` (the curves).
Command line: ``python -m zofast.grid run|plan|report`` (also ``python -m zofast.experiments
grid ...``); see docs/usage.md, "The accuracy grid".
"""
