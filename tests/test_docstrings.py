"""Every docstring example of the installed zofast package runs and gives the output it shows.

Examples may use ``torch`` and zofast's public names (``zofast.__all__``) without importing them.
Each runs in a fresh temporary folder (files an example writes go there). Single lines that need
what CI does not have (network, a GPU, a file of the user's) carry ``# doctest: +SKIP`` and say
why; whole docstrings that cannot run here (fragments that use names set up around them, whole
training runs, the LM-BFF data) are listed in NOT_RUN with the reason, which pytest -ra prints;
a docstring whose shown result is wrong is in WRONG (a strict xfail); slow ones are marked slow.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import zofast

_FRAGMENT = "a fragment: it uses names (a model, a scorer, hooks, ...) set up around it"
_RUN = "a whole training run or grid: minutes on 2 CPU cores"
# Docstrings whose examples are not run, each with why. Every name must still exist (a renamed
# docstring fails test_the_skip_lists_name_existing_docstrings instead of silently running).
NOT_RUN = {
    "zofast.data.load_kshot": "needs the LM-BFF k-shot data (../shared/data)",
    "zofast.dfo.lora": "needs the LM-BFF k-shot data (../shared/data)",
    "zofast.experiments.GridConfig.train_config": "needs the LM-BFF k-shot data",
    "zofast.plot.plot_run": "reads a finished run's log",
    "zofast.plot.read_log": "reads a finished run's log",
    "zofast.train": _RUN,
    "zofast.train.config.TrainResult": _RUN,
    "zofast.train.loop.resume": _RUN,
    "zofast.train.loop.train": _RUN,
    "zofast.dfo.experiments": _RUN,
    "zofast.dfo.experiments.main": _RUN,
    "zofast.dfo.experiments.run_grid": _RUN,
    **{
        name: _FRAGMENT
        for name in (
            "zofast.dfo.arch",
            "zofast.dfo.arch.Architecture",
            "zofast.dfo.arch.Architecture.describe",
            "zofast.dfo.arch.LowRankHooks",
            "zofast.dfo.arch.LowRankHooks.clear_population",
            "zofast.dfo.arch.LowRankHooks.get_layer",
            "zofast.dfo.arch.LowRankHooks.merged",
            "zofast.dfo.arch.LowRankHooks.remove",
            "zofast.dfo.arch.LowRankHooks.set_layer",
            "zofast.dfo.arch.LowRankHooks.set_population",
            "zofast.dfo.arch.find_architecture",
            "zofast.dfo.fireworks.Fireworks.get_state",
            "zofast.dfo.fireworks.Fireworks.set_state",
            "zofast.dfo.population",
            "zofast.dfo.population.PopulationEvaluator",
            "zofast.dfo.population.PopulationEvaluator.current_loss",
            "zofast.dfo.population.PopulationEvaluator.fused_activations",
            "zofast.dfo.population.PopulationEvaluator.input_stds",
            "zofast.dfo.population.PopulationEvaluator.losses",
            "zofast.dfo.population.PopulationEvaluator.sequential_losses",
            "zofast.dfo.state",
            "zofast.dfo.state.cma_state",
            "zofast.dfo.state.set_cma_state",
            "zofast.hf.TrainerOptimizer",
            "zofast.hf.ZOTrainer",
            "zofast.hf.build_optimizer",
            "zofast.encoding.Batch",
            "zofast.encoding.Batch.repeat",
            "zofast.encoding.Batch.to",
            "zofast.scoring.Scorer",
            "zofast.scoring.Scorer.accuracy",
            "zofast.scoring.Scorer.encode",
            "zofast.scoring.Scorer.forward_hidden",
            "zofast.scoring.Scorer.head_logits",
            "zofast.scoring.Scorer.label_tokens",
            "zofast.scoring.Scorer.logits",
            "zofast.scoring.Scorer.loss",
            "zofast.scoring.Scorer.losses",
            "zofast.scoring.Scorer.predict",
            "zofast.dfo.lora.checkpoint",
            "zofast.dfo.lora.checkpoint.load",
            "zofast.dfo.lora.checkpoint.save",
            "zofast.dfo.lora.export",
            "zofast.dfo.lora.export.export_peft",
            "zofast.dfo.lora.layer",
            "zofast.dfo.lora.layer.Projections",
            "zofast.dfo.lora.layer.Projections.factors",
            "zofast.dfo.lora.layer.Projections.projection",
            "zofast.dfo.lora.model",
            "zofast.dfo.lora.model.DFOLoRA",
            "zofast.dfo.lora.model.DFOLoRA.export_peft",
            "zofast.dfo.lora.model.DFOLoRA.factors",
            "zofast.dfo.lora.model.DFOLoRA.load",
            "zofast.dfo.lora.model.DFOLoRA.projection",
            "zofast.dfo.lora.model.DFOLoRA.remove",
            "zofast.dfo.lora.model.DFOLoRA.save",
            "zofast.dfo.lora.model.DFOLoRA.set_z",
            "zofast.dfo.lora.search",
            "zofast.dfo.lora.search.LayerSearch.fit",
            "zofast.dfo.lora.search.LayerSearch.result",
            "zofast.layouts.parse_label_map",
            "zofast.layouts.read_table",
            "zofast.layouts.resolve_layout",
            "zofast.train.checkpoint.read",
            "zofast.train.evaluation.evaluate",
            "zofast.train.evaluation.trajectory_prefix",
            "zofast.train.evaluation.trajectory_slice",
            "zofast.train.inputs.trainable_parameters",
        )
    },
}
# Examples whose shown result is wrong: they must fail until the docstring or the code is fixed.
WRONG: dict[str, str] = {}
SLOW = {"zofast.cli.main"}  # a 2-step run of the embedded MiniLM


def _examples() -> list:
    names = ["zofast"] + [
        m.name for m in pkgutil.walk_packages(zofast.__path__, "zofast.") if m.name != "zofast._C"
    ]
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for name in sorted(names):
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            if test.examples and test.name not in {t.name for t in found}:
                found.append(test)
    return found


EXAMPLES = _examples()


def _marks(name: str) -> list:
    if name in NOT_RUN:
        return [pytest.mark.skip(reason=NOT_RUN[name])]
    if name in WRONG:
        return [pytest.mark.xfail(reason=WRONG[name], strict=True)]
    return [pytest.mark.slow] if name in SLOW else []


def test_the_skip_lists_name_existing_docstrings():
    names = {t.name for t in EXAMPLES}
    assert not (set(NOT_RUN) | set(WRONG) | SLOW) - names


@pytest.mark.parametrize(
    "test", [pytest.param(t, id=t.name, marks=_marks(t.name)) for t in EXAMPLES]
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
