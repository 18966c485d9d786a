"""qcircuit.runtime: models (offline), binding programs to layers, adapters, checkpoints, qcompile."""
from .bind import Target, bind
from .models import EMBEDDED_MODELS, LoadedModel, load_model

__all__ = ["attach", "load", "Adapted", "load_model", "LoadedModel", "EMBEDDED_MODELS",
           "bind", "Target"]


def __getattr__(name: str):
    # adapter.py is being written in parallel: imported lazily until it lands.
    if name in ("attach", "load", "Adapted"):
        from . import adapter
        return getattr(adapter, name)
    raise AttributeError(f"module 'qcircuit.runtime' has no attribute {name!r}")
