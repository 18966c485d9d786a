"""qcircuit.compiler: lower a Circuit to a tensor graph, analyse it, plan its contractions
with opt_einsum and emit a torch module (``compile(circuit).module()``)."""
from .module import CircuitModule
from .planning import PathPlan, Plan, compile, token_bucket

__all__ = ["compile", "Plan", "PathPlan", "CircuitModule", "token_bucket"]
