"""qcircuit.compiler: lower a Circuit to a tensor graph, analyse it, plan its contractions
with opt_einsum, decide how each token bucket runs (routes in a registry, chosen by
measurement and remembered in a :class:`Tuning`) and emit a torch module
(``compile(circuit).module()``).

The modules, bottom-up (imports point down only):

- ``caps``, ``cachefiles``, ``costmodel``, ``threads``, ``workspace``, ``kernels``, ``fused``:
  limits, cache files, the cost model's prices, CPU helpers and C kernels
- ``graph``, ``analysis``, ``networks``, ``lowered``: the circuit as a graph, its analyses,
  einsum networks and contraction paths (pure)
- ``schedule``, ``step_matrices``, ``schedule_exec``, ``dense``, ``lightcone``: the GEMM schedule and the light
  cone, planned and run
- ``routes``: the registry of routes (name, device predicate, search, predict, build)
- ``wisdom``, ``calibrate``, ``measure``, ``choice``: remembered winners, machine constants,
  timing, and the choice of a route
- ``tuning``: the state of all of it as one object, and the rule "decide, then run"
- ``dispatch``, ``module``, ``plan``: what a call runs, the torch module, ``compile``
"""
from .choice import Decision
from .module import CircuitModule
from .networks import ContractionPath, token_bucket
from .plan import Plan, compile
from .routes import Route, register
from .tuning import Tuning

__all__ = ["compile", "Plan", "ContractionPath", "Decision", "CircuitModule", "Route",
           "register", "Tuning", "token_bucket"]
