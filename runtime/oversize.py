"""Circuits nearly as large as the layers they adapt: one warning each.

A circuit adapter is worth having because it trains far fewer parameters than the layer
it adapts: the paper's LLaMA-2-7B circuit (qudits 16·8·8·4, all pairs) trains 43,008
parameters on a 4096×4096 ``q_proj``, 0.26 % of the layer. Few qudits make large gates:
``qudits auto 2`` on a 384-wide layer is one 384×384 gate, exactly as many parameters as
the layer (full fine-tuning of it, through a detour). A warning is given above
``NEAR_FULL`` = 25 % of ``in_features · out_features``: LoRA of rank r on a square d-wide
layer trains 2r/d of it, so 25 % is rank d/8, far above the ranks in use (8 to 64 on
4096-wide layers: 0.4 % to 3 %), and an adapter that large saves less than a factor of
four over training the layer itself. Circuits of three or more balanced qudits stay well
below (``qudits auto 3`` with all pairs on a 384-wide layer, 8·8·6: 6 %).
"""
from __future__ import annotations

from typing import Iterable

from .bind import Target
from .report import dims_text

NEAR_FULL = 0.25  #: warn when a circuit has more than this share of its layer's in·out weights


class NearFullSizeWarning(UserWarning):
    """``attach``'s warning: a circuit nearly as large as its layer (filterable)."""


def near_full_size(targets: Iterable[Target]) -> list[str]:
    """One message per distinct circuit (name and concrete dims) whose parameters exceed
    ``NEAR_FULL`` of the ``in_features · out_features`` of the layers it adapts."""
    seen, out = set(), []
    for t in targets:
        key = (t.circuit_name, t.circuit)
        if key in seen:
            continue
        seen.add(key)
        size = t.in_features * t.out_features
        params = t.circuit.num_params
        if params > NEAR_FULL * size:
            out.append(f"circuit {t.circuit_name!r} ({dims_text(t.circuit)}, on {t.pattern}) "
                       f"has {params:,} parameters per module, {params / size:.0%} of the "
                       f"layer's {t.in_features}x{t.out_features} = {size:,} weights: near "
                       f"full fine-tuning (warned above {NEAR_FULL:.0%}; more qudits make "
                       "smaller gates)")
    return out
