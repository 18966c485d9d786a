"""qcircuit.runtime: models (offline), binding programs to layers, adapters, checkpoints, qcompile."""
from .adapter import Adapted, attach, load
from .bind import Target, bind
from .models import EMBEDDED_MODELS, LoadedModel, load_model

__all__ = ["attach", "load", "Adapted", "load_model", "LoadedModel", "EMBEDDED_MODELS",
           "bind", "Target"]
