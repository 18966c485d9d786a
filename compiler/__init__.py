"""qcircuit.compiler: lower a Circuit to a tensor graph, analyse it, plan its contractions
with opt_einsum, choose how each token bucket runs (``routes.py``, measured and remembered in
``wisdom.py``) and emit a torch module (``compile(circuit).module()``)."""
from .module import CircuitModule
from .planning import PathPlan, Plan, compile, token_bucket
from .routes import RoutePlan

__all__ = ["compile", "Plan", "PathPlan", "RoutePlan", "CircuitModule", "token_bucket"]
