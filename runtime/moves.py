"""Moving many adapted layers at once, all or nothing, with no weight changed by a refusal.

``move_all(layers, call)`` runs ``fold``/``unfold``/``merge``/``unmerge`` on every layer in
two passes. The first plans every layer's move (``AdaptedLayer.plan_move``: float64, every
check: non-finite gates, overflow, a merge that unmerge could not undo) and writes
nothing, so a refusal leaves every weight bit for bit as it was. The second plans each
layer again (the same computation on the same numbers: the same result) and writes it,
with Ctrl-C held until the last layer is written (``held_interrupts``), so an interrupt
cannot leave some layers moved and others not. Peak memory is one layer's move at a time.
The PEFT tuner uses the first pass (``check_all``) before PEFT's own loop writes.
"""
from __future__ import annotations

from typing import Mapping

from .atomic_dir import held_interrupts
from .layer import AdaptedLayer
from .weights import warn_large_updates

__all__ = ["check_all", "move_all", "held_interrupts"]


def check_all(layers: Mapping[str, AdaptedLayer], call: str, *, reversible: bool = True,
              when: str | None = None) -> None:
    """Plan ``call`` on every layer and write nothing: a ``QCError`` names the first layer
    that refuses; updates far larger than the base weight are reported (one warning)."""
    ratios = {name: layer.plan_move(call, reversible=reversible).update_ratio
              for name, layer in layers.items()}
    warn_large_updates(ratios, when or "merging")


def move_all(layers: Mapping[str, AdaptedLayer], call: str, *, reversible: bool = True) -> None:
    """``call`` on every layer, or on none (see the module doc)."""
    check_all(layers, call, reversible=reversible)
    with held_interrupts():
        for layer in layers.values():
            layer.apply(layer.plan_move(call, reversible=reversible))
