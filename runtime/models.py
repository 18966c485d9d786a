"""Models, offline: embedded shape-only configs and local directories.

``load_model("llama-2-7b")`` builds the model from an embedded copy of its published
``config.json`` on the meta device (shapes only, no memory, no download).
``load_model("path/to/dir")`` does the same from ``dir/config.json``, and loads the
weights with ``from_pretrained(local_files_only=True)`` when the directory has
safetensors files. The transformers Auto class is chosen from the config's
``architectures`` (``…ForCausalLM``, ``…ForMaskedLM``, …; a bare backbone gets ``AutoModel``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qcircuit.errors import QCError

from .model_config import MAX_PARAMS, check_config, read_config_file

#: embedded model name -> file under runtime/configs/
EMBEDDED_MODELS: tuple[str, ...] = (
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "mistral-7b",
    "roberta-base", "roberta-large", "all-minilm-l6-v2",
)

# architecture-name suffix -> transformers Auto class name (first match wins)
_AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
)


@dataclass(frozen=True, eq=False)  # identity semantics: it holds a live model
class LoadedModel:
    """A model and where it came from.

    ``name`` identifies it: the embedded name, or the directory's absolute path.
    ``source`` is ``"embedded"`` or ``"local"``; ``has_weights`` says whether real
    weights were loaded (otherwise the parameters live on the meta device).
    """

    model: torch.nn.Module
    config: Any
    name: str
    source: str
    has_weights: bool

    @property
    def total_params(self) -> int:
        return count_params(self.model)

    @property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint records about the model it was made for."""
        return {"name": self.name, "model_type": getattr(self.config, "model_type", None),
                "architectures": list(getattr(self.config, "architectures", None) or []),
                "class": type(self.model).__name__}


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters, shared (tied) tensors counted once; works on meta models."""
    return sum(p.numel() for p in model.parameters())


def embedded_config_dict(name: str) -> dict[str, Any]:
    """The published ``config.json`` fields of an embedded model."""
    key = name.lower()
    if key not in EMBEDDED_MODELS:
        raise _unknown(name)
    text = resources.files("qcircuit.runtime").joinpath("configs", f"{key}.json").read_text()
    return json.loads(text)


def auto_class(config: Any):
    """The transformers Auto class matching the config's first architecture."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    arch = archs[0] if archs else ""
    for suffix, auto_name in _AUTO_CLASSES:
        if arch.endswith(suffix):
            return getattr(transformers, auto_name)
    return transformers.AutoModel


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Build an embedded model on the meta device, or load a local directory.

    A directory without safetensors weights is built on the meta device, like an
    embedded model. An existing directory wins over an embedded name it shadows. Unknown
    names raise ``QCError`` listing the embedded ones; a bad ``config.json`` (see
    ``model_config``) or one transformers cannot build raises ``QCError`` naming the file.
    """
    text = str(name_or_path)
    if text.lower() in EMBEDDED_MODELS and not Path(text).is_dir():
        name = text.lower()
        where = f"embedded config {name}"
        config, model = _build(check_config(embedded_config_dict(name), where), where, dtype, None)
        return LoadedModel(model, config, name, "embedded", False)
    path = Path(text)
    if not path.is_dir():
        raise _unknown(text)
    return _load_local(path.resolve(), dtype)


def _unknown(name: str) -> QCError:
    return QCError(f"unknown model {name!r}: not an embedded model nor a directory with config.json",
                   expected="one of " + ", ".join(EMBEDDED_MODELS) + " or a local directory")


def _config_from_dict(fields: dict[str, Any]):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[fields["model_type"]].from_dict(dict(fields))


def _build_meta(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        model = auto_class(config).from_config(config, dtype=dtype)
    return model.eval()


def _build(fields: dict[str, Any], where: str, dtype: torch.dtype, weights_from: Path | None):
    """``(config, model)`` from checked ``fields``: on the meta device, or with the weights
    of ``weights_from``. Whatever transformers raises becomes a QCError naming ``where``;
    only MemoryError (and KeyboardInterrupt) pass through."""
    try:
        config = _config_from_dict(fields)
        model = _build_meta(config, dtype)
        if weights_from is not None:
            _check_weights_cover(model, weights_from)
            model = auto_class(config).from_pretrained(
                str(weights_from), config=config, local_files_only=True, dtype=dtype,
                use_safetensors=True).eval()
    except (QCError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises anything on a bad config
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise QCError(f"cannot build a model from {where}: {detail}") from None
    total = count_params(model)
    if total > MAX_PARAMS:
        raise QCError(f"{where}: {total:,} parameters, over the cap of {MAX_PARAMS:,}")
    return config, model


def _check_weights_cover(meta_model: torch.nn.Module, folder: Path) -> None:
    """Refuse a directory whose safetensors files (headers only) hold fewer values than
    the model has parameters: transformers would fill the rest with random values, and a
    small file beside a huge config would make it allocate the whole model."""
    stored = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            stored += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    needed = count_params(meta_model)
    if stored < needed:
        raise QCError(f"{folder}: config.json describes {needed:,} parameters but the "
                      f"safetensors files hold {stored:,} values: weights are missing")


def _load_local(path: Path, dtype: torch.dtype) -> LoadedModel:
    config_file = path / "config.json"
    fields = read_config_file(config_file)
    weights = path if any(path.glob("*.safetensors")) else None
    config, model = _build(fields, str(config_file) if weights is None else str(path), dtype,
                           weights)
    return LoadedModel(model, config, str(path), "local", weights is not None)
