"""qcircuit.runtime: models (offline), binding programs to layers, adapters, checkpoints, qcompile.

The names below are imported when first used (PEP 562), so importing the package costs
nothing heavy: ``qcompile`` imports it before it can handle Ctrl-C (``console.py``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .bind import Target, bind   # light; imported first so ``bind`` is the function

_LAZY = {"attach": "adapter", "load": "adapter", "Adapted": "adapter",
         "AdaptedLayer": "layer", "LayerState": "layer",
         "load_model": "models", "LoadedModel": "models", "EMBEDDED_MODELS": "models",
         "import_reference": "reference", "read_reference": "reference",
         "AdapterTrainer": "trainer", "AdapterCheckpoints": "trainer"}

__all__ = ["attach", "load", "Adapted", "AdaptedLayer", "LayerState", "load_model", "LoadedModel",
           "EMBEDDED_MODELS", "bind", "Target", "import_reference", "read_reference",
           "AdapterTrainer", "AdapterCheckpoints"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .adapter import Adapted, attach, load
    from .layer import AdaptedLayer, LayerState
    from .models import EMBEDDED_MODELS, LoadedModel, load_model
    from .reference import import_reference, read_reference
    from .trainer import AdapterCheckpoints, AdapterTrainer
