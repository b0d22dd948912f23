"""First-order LoRA (PEFT) on the attention projections, trained by Adam: the ``lora`` method.

The adapters (rank ``config.rank``, alpha ``2 · rank``, dropout 0: the usual LoRA settings, rank 8
and alpha 16 in the accuracy grid) go on every attention projection, found by name
(:data:`TARGETS`: BERT / RoBERTa / MiniLM query, key, value and attention output; OPT and Llama
q/k/v and output projections; GPT-2's fused ``c_attn`` and its ``attn.c_proj``). Only the adapter
weights train; a step is one forward and one backward pass (3 forwards of the budget, as Adam).

The run ends with a plain model: :meth:`LoRA.close` keeps a host copy of the projections' base
weights, merges the adapters into them and takes the PEFT wrappers out of the model;
:meth:`LoRA.restore` (the best dev checkpoint) puts the base weights back and merges the
snapshot's adapters instead (one rounding, as PEFT's merge: a best checkpoint at step 0 is the
base model bit for bit). So the test accuracy, ``save_model``'s folder and the caller's model are
the merged best weights.
"""

from __future__ import annotations

import torch

from zofast.models import LoadedModel
from zofast.scoring import Scorer
from zofast.train.config import ConfigError, TrainConfig
from zofast.train.methods import Adam

TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.out_proj",
    "attn.c_attn",
    "attn.c_proj",
)
"""Name suffixes of the attention projections that get adapters (BERT-like, OPT / Llama, GPT-2)."""


def attention_projections(model: torch.nn.Module) -> list[str]:
    """The qualified names of ``model``'s attention projections (:data:`TARGETS`).

    Args:
        model: a transformers model.

    Returns:
        Module names, in ``named_modules`` order.

    Raises:
        ConfigError: no module matches (an architecture this list does not know).

    Example:
        >>> from zofast.models import load_model
        >>> attention_projections(load_model().model)[:2]
        ['encoder.layer.0.attention.self.query', 'encoder.layer.0.attention.self.key']
    """
    names = [
        name
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in TARGETS)
        and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")
    ]
    if not names:
        raise ConfigError(
            "method lora found no attention projection (module names ending in "
            f"{', '.join(TARGETS)}) in {type(model).__name__}"
        )
    return names


class LoRA(Adam):
    """Adam on PEFT LoRA adapters of the attention projections (see the module docstring)."""

    def __init__(self, config: TrainConfig, loaded: LoadedModel, scorer: Scorer, batches):
        try:
            from peft import LoraConfig, inject_adapter_in_model
            from peft.tuners.lora import LoraLayer
        except ImportError as error:
            raise ConfigError(f"method lora needs peft (pip install peft): {error}") from None
        model = loaded.model
        targets = attention_projections(model)
        self._grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        rank = config.resolved_rank
        lora = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=targets,
            fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()),
        )
        # PEFT draws A from the global RNG: draw it from the run's seed and leave the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(config.seed)
            inject_adapter_in_model(lora, model)
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        super().__init__(config, loaded, scorer, batches)
        self.log_fields["lora_targets"] = len(targets)
        self.attached = True

    def close(self) -> None:
        """Merge the current adapters into the weights and take the PEFT wrappers out."""
        super().close()
        if not self.attached:
            return
        model = self.loaded.model
        self.base = {
            n: m.get_base_layer().weight.to("cpu", copy=True) for n, m in self.layers.items()
        }
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.merge()
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, layer.get_base_layer())
        for name, p in model.named_parameters():
            p.requires_grad_(self._grad_flags.get(name, False))
        if hasattr(model, "peft_config"):  # set by inject_adapter_in_model
            del model.peft_config
        self.attached = False

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Put the snapshot's adapters on the model: merged, if :meth:`close` has run."""
        if self.attached:
            return super().restore(snapshot)
        with torch.no_grad():
            for name, p in self.trained:
                p.copy_(snapshot[name].to(p.device))
            for name, layer in self.layers.items():
                weight = layer.get_base_layer().weight
                weight.copy_(self.base[name].to(weight.device))
                layer.merged_adapters.clear()
                layer.merge()
