"""The emitted torch module: ``m(x) = T·x`` on ``[..., in_features]`` and ``m.matrix() = T``.

Gate tensors live in ``m.gates`` (an ``nn.ParameterList``, circuit order, each shaped
``out_dims + in_dims``), so ``state_dict`` keys are ``gates.0``, ``gates.1``, …. What runs is
:mod:`dispatch`'s business: ``forward`` runs the route decided for the token count's bucket
by the module's :class:`~tuning.Tuning` (the process default unless one was handed in;
decided before the forward records anything, or ahead with ``plan.warm_up``), or the route
named at construction (``route=``); ``matrix`` the dense route. Traced code
(``torch.compile``) and gates that are not plain tensors (``DTensor``) run the
one-expression path planned once at construction, so a forward under tracing plans nothing.
"""
from __future__ import annotations

import math
import torch
from torch import nn

from qcircuit.errors import QCError
from qcircuit.ir import Gate

from . import dispatch
from . import tuning as tuning_mod
from .lowered import Lowered
from .routes import route_named

INITS = ("kaiming", "zeros", "identity")


def init_gate(gate: Gate, index: int, init: str, generator: torch.Generator | None) -> torch.Tensor:
    """One gate's initial tensor in float64 on the CPU (cast by the caller)."""
    if init == "kaiming":
        bound = math.sqrt(3.0 / gate.in_size)  # Kaiming-uniform, linear gain, fan_in = in_size
        return (torch.rand(gate.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    if init == "zeros":
        return torch.zeros(gate.shape, dtype=torch.float64)
    if init == "identity":
        if not gate.is_square:
            raise QCError(f"init 'identity' needs square gates: gate {index} on {gate.qudits} maps "
                          f"{'x'.join(map(str, gate.in_dims))} -> {'x'.join(map(str, gate.out_dims))}")
        return torch.eye(gate.in_size, dtype=torch.float64).reshape(gate.shape)
    raise QCError(f"unknown init {init!r}", expected=" or ".join(INITS))


def init_gates(gates: tuple[Gate, ...], init: str = "kaiming", seed: int | None = None,
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Initial tensors of every gate (float64, CPU); ``seed`` or ``generator`` makes them
    reproducible, whatever dtype and device they are cast to later."""
    if init not in INITS:
        raise QCError(f"unknown init {init!r}", expected=" or ".join(INITS))
    if seed is not None and generator is not None:
        raise QCError("give a seed or a generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise QCError(f"seed must be an integer, got {seed!r}")
        generator = torch.Generator().manual_seed(seed)
    return [init_gate(g, k, init, generator) for k, g in enumerate(gates)]


class CircuitModule(nn.Module):
    """The circuit operator as a module: ``forward(x[..., in]) -> [..., out]``."""

    def __init__(self, plan: Lowered, init: str = "kaiming", seed: int | None = None,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None,
                 tuning: tuning_mod.Tuning | None = None, route: str | None = None):
        super().__init__()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise QCError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
        if route is not None:
            route_named("forward", route)  # a QCError naming the routes there are
        self.plan = plan
        self.tuning = tuning   # None: the process default (tuning.default()) at each call
        self.route = route
        tensors = init_gates(plan.circuit.gates, init, seed, generator)
        self.gates = nn.ParameterList(
            [nn.Parameter(t.to(device=device, dtype=dtype)) for t in tensors])
        # tracks dtype and device through .to() when there is no gate; not saved
        self.register_buffer("_anchor", torch.empty(0, dtype=dtype, device=device),
                             persistent=False)
        self.trace_path = dispatch.trace_path(plan)  # plain data: what traced forwards run

    @property
    def in_features(self) -> int:
        return self.plan.in_features

    @property
    def out_features(self) -> int:
        return self.plan.out_features

    def _gate_list(self) -> list[torch.Tensor]:
        """The gates in order (tied ones repeated): 4× cheaper than iterating the
        ParameterList, which goes through ``Module.__getattr__`` per element."""
        gates = [p for _, p in self.gates.named_parameters(recurse=False, remove_duplicate=False)]
        if len(gates) != len(self.gates):  # a DataParallel replica holds plain tensors instead
            gates = [getattr(self.gates, str(i)) for i in range(len(self.gates))]
        return gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise QCError(f"input has {x.shape[-1] if x.dim() else 0} features as its last dim; "
                          f"this circuit takes {self.in_features}")
        gates = self._gate_list()
        like = gates[0] if gates else self._anchor
        if not gates and x.dtype != like.dtype:
            x = x.to(like.dtype)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        n = x2d.shape[0]
        if n == 0:
            return x2d.new_zeros(*lead, self.out_features, dtype=like.dtype)
        y = dispatch.forward(self.plan, x2d, gates, self.tuning or tuning_mod.default(),
                             self.trace_path, self.route)
        return y.reshape(*lead, self.out_features)

    def takes_uncast(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` runs ``x`` in its own dtype against these gates (16-bit
        activations on a route that takes them, ``dispatch.uncast``) rather than cast."""
        gates = self._gate_list()
        return bool(gates) and x.dtype != gates[0].dtype and dispatch.uncast(
            self.plan, x.reshape(-1, self.in_features), gates[0].dtype,
            self.tuning or tuning_mod.default(), self.route) is not None

    def matrix(self) -> torch.Tensor:
        """The dense operator ``T``, shape ``(out_features, in_features)``, differentiable."""
        if not len(self.gates):
            like = self._anchor
            return torch.eye(self.in_features, dtype=like.dtype, device=like.device)
        return dispatch.dense(self.plan, self._gate_list(), self.tuning or tuning_mod.default())

    def extra_repr(self) -> str:
        c = self.plan.circuit
        dims = "x".join(map(str, c.in_dims))
        if c.out_dims != c.in_dims:
            dims += " -> " + "x".join(map(str, c.out_dims))
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qudits={dims}, gates={len(c.gates)}, params={self.plan.num_params}, "
                f"rank_bound={self.plan.rank_bound}" + (f", route={self.route}" if self.route else ""))
