"""Export: DFO-LoRA's applied modules as a PEFT LoRA adapter (``PeftModel`` loads it).

Example:
    >>> export_peft(dfo, "runs/adapter")  # the same as dfo.export_peft("runs/adapter")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from zofast.dfo.lora.model import DFOLoRA

__all__ = ["export_peft"]


def _float_factors(dfo: DFOLoRA, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    z = dfo._applied[layer]
    if not np.any(z):
        out = {}
        for name in dfo.targets:
            t = dfo.arch.targets[layer][name]
            out[name] = (
                torch.zeros(t.in_features, dfo.rank),
                torch.zeros(dfo.rank, t.out_features),
            )
        return out
    mats = dfo.factors(layer, z[None], dtype=torch.float32)
    return {k: (a[0].cpu(), b[0].cpu()) for k, (a, b) in mats.items()}


def export_peft(dfo: DFOLoRA, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the applied modules as a PEFT LoRA adapter (loadable by ``PeftModel``).

    ``adapter_config.json`` + ``adapter_model.safetensors`` (float32), one LoRA per target
    module, ``lora_alpha = r`` (scaling 1), no dropout, no bias. A separate projection gets
    ``lora_A.weight = Aᵀ`` ``(r, D_in)`` and ``lora_B.weight = Bᵀ`` ``(D_out, r)``. GPT-2's
    fused ``c_attn`` (``fan_in_fan_out=True``) gets one LoRA of rank ``r·len(targets)``:
    ``lora_A`` stacks the targets' ``Aᵀ``, and ``lora_B`` (``3D × r·len(targets)``) holds each
    target's ``Bᵀ`` in its own output slice and rank columns, zeros elsewhere (the V slice
    stays zero when V is not a target). Module names are full paths in the model, so that
    ``PeftModel.from_pretrained(unmodified_model, path)`` reproduces the tuned logits.

    Args:
        dfo: the search whose applied vectors are written.
        path: output folder (created).
        base_model_name_or_path: recorded in the config (default: the model's name).

    Returns:
        The folder.

    Example:
        >>> export_peft(dfo, "runs/adapter")
        >>> peft_model = peft.PeftModel.from_pretrained(fresh_model, "runs/adapter")
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    fused = False
    named = dict(dfo.model.named_modules())
    for layer in range(dfo.num_layers):
        mats = _float_factors(dfo, layer)
        groups: dict[str, list] = {}
        for name in dfo.targets:
            t = dfo.arch.targets[layer][name]
            groups.setdefault(t.module_name, []).append(t)
        for module_name, ts in groups.items():
            prefix = f"base_model.model.{module_name}"
            if ts[0].fused:
                fused = True
                width = named[module_name].weight.shape[1]
                a = torch.cat([mats[t.name][0] for t in ts], dim=1).T.contiguous()
                b = torch.zeros(width, dfo.rank * len(ts))
                for j, t in enumerate(ts):
                    start, stop = t.out_slice
                    b[start:stop, j * dfo.rank : (j + 1) * dfo.rank] = mats[t.name][1].T
            else:
                a = mats[ts[0].name][0].T.contiguous()
                b = mats[ts[0].name][1].T.contiguous()
            weights[f"{prefix}.lora_A.weight"] = a
            weights[f"{prefix}.lora_B.weight"] = b
            modules.append(module_name)
    r = dfo.rank * (len(dfo.targets) if fused else 1)
    name = base_model_name_or_path
    if name is None:
        name = dfo.loaded.name if dfo.loaded is not None else None
        name = name or getattr(getattr(dfo.model, "config", None), "_name_or_path", None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fused,
        "target_modules": modules,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    save_file(weights, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
