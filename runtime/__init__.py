"""qcircuit.runtime: models (offline), binding programs to layers, adapters, checkpoints, qcompile."""
from .adapter import Adapted, attach, load
from .layer import AdaptedLayer, LayerState
from .bind import Target, bind
from .models import EMBEDDED_MODELS, LoadedModel, load_model
from .reference import import_reference, read_reference

__all__ = ["attach", "load", "Adapted", "AdaptedLayer", "LayerState", "load_model", "LoadedModel",
           "EMBEDDED_MODELS", "bind", "Target", "import_reference", "read_reference"]
