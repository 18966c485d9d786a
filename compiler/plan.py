"""``compile(circuit)`` and the :class:`Plan` it returns: the compiler's front door.

A ``Plan`` is a :class:`~lowered.Lowered` circuit (graph, analyses, einsum networks: plain,
immutable data) with the calls a user makes on it: emit a module, explain or make the
decisions of some token counts ahead of time, get executors. Decisions and executors live
in a :class:`~tuning.Tuning` — the process default unless one is passed — never in the plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qcircuit.errors import QCError
from qcircuit.ir import Circuit

from . import dispatch
from . import tuning as tuning_mod
from .caps import MODULE_MAX_PARAMS
from .choice import Decision
from .lowered import Lowered, lowered_fields
from .module import CircuitModule
from .networks import Executor, DenseExecutor, token_bucket


@dataclass(frozen=True, eq=False)
class Plan(Lowered):
    """A compiled circuit (see the module docstring)."""

    def decision(self, tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32,
                 tuning: tuning_mod.Tuning | None = None) -> Decision:
        """The :class:`Decision` that runs ``tokens`` rows on ``device`` in ``dtype`` (made
        now if it was not)."""
        t = tuning or tuning_mod.default()
        return t.decision(self, "forward", token_bucket(tokens), torch.device(device), dtype)

    def explain(self, tokens: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32,
                tuning: tuning_mod.Tuning | None = None) -> str:
        """Text: the candidate routes for ``tokens``, predicted and measured times, the winner."""
        return self.decision(tokens, device, dtype, tuning).explain()

    def executor(self, tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, tuning: tuning_mod.Tuning | None = None,
                 route: str | None = None) -> Executor:
        """``run(x (tokens, in_features), gates) -> (tokens, out_features)`` for this bucket
        (``route``: that route, not the decided one)."""
        t = tuning or tuning_mod.default()
        return t.executor(self, "forward", token_bucket(tokens), torch.device(device), dtype,
                          route)

    def warm_up(self, *tokens: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32,
                tuning: tuning_mod.Tuning | None = None) -> "Plan":
        """Decide (measuring where needed) the routes of these token counts and of the dense
        matrix (in ``dtype`` and in float64, which merging uses) now; returns ``self``."""
        t = tuning or tuning_mod.default()
        device = torch.device(device)
        for n in tokens:
            t.executor(self, "forward", token_bucket(n), device, dtype)
        for d in dict.fromkeys((dtype, torch.float64)):
            t.decision(self, "dense", None, device, d)
        return self

    def dense_executor(self, tuning: tuning_mod.Tuning | None = None) -> DenseExecutor:
        """``run(gates) -> T (out_features, in_features)``; the route follows the gates'
        device and dtype (and whether autograd records)."""
        t = tuning or tuning_mod.default()
        return lambda gates: dispatch.dense(self, gates, t)

    def module(self, init: str = "kaiming", seed: int | None = None,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None,
               tuning: tuning_mod.Tuning | None = None, route: str | None = None) -> CircuitModule:
        """A fresh ``CircuitModule`` computing this circuit (see ``module.py``); ``route``
        pins its forward to one registered route (debugging, benchmarks)."""
        if self.num_params > MODULE_MAX_PARAMS:
            raise QCError(f"the circuit has {self.num_params:,} parameters; a module holds at "
                          f"most {MODULE_MAX_PARAMS:,} (MODULE_MAX_PARAMS)")
        return CircuitModule(self, init=init, seed=seed, generator=generator, dtype=dtype,
                             device=device, tuning=tuning, route=route)


def compile(circuit: Circuit) -> Plan:  # noqa: A001 - the public name DESIGN.md fixes
    """Lower a concrete circuit, analyse it and prepare its planning (paths are lazy)."""
    return Plan(**lowered_fields(circuit))
