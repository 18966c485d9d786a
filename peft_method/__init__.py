"""QuanTA as a PEFT method: ``import qcircuit.peft`` registers it with stock PEFT.

    import qcircuit.peft
    from qcircuit.peft import QuanTAConfig
    from peft import get_peft_model
    model = get_peft_model(base, QuanTAConfig(program="adapter.qc"))

PEFT's own ``register_peft_method`` accepts only names of its closed ``PeftType`` enum.
Its maps are keyed by those members, which are ``str`` subclasses equal to (and hashing
like) their value, so the string ``"QUANTA"`` is a key like theirs: :func:`register`
writes the three entries directly, and refuses if another method already took the name.
It also puts qcircuit's checks in front of PEFT's config reader (``guard.py``), so both
PEFT doors refuse a bad QuanTA directory exactly as native ``load`` does.
"""
from __future__ import annotations

from . import guard
from .config import PEFT_TYPE_NAME, QUANTA, QuanTAConfig
from .layer import QuanTALayer
from .model import QuanTAModel

__all__ = ["QuanTAConfig", "QuanTAModel", "QuanTALayer", "QUANTA", "register"]


#: PEFT internals this module relies on besides the three maps: the tuner hooks that map
#: checkpoint keys, and the flag that keeps ``inject_adapter_in_model`` open to the tuner.
_TUNER_HOOKS = ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load",
                "_remove_adapter_name_from_key", "uses_shared_state")


def register() -> None:
    """Add QuanTA to PEFT's config, tuner and prefix maps (idempotent)."""
    import peft
    from peft import mapping
    from peft.tuners.tuners_utils import BaseTuner

    missing = [h for h in _TUNER_HOOKS if not hasattr(BaseTuner, h)]
    if missing:
        raise ImportError(f"qcircuit.peft needs peft>=0.21,<0.22 (found {peft.__version__}, "
                          f"whose BaseTuner lacks {', '.join(missing)})")

    entries = ((mapping.PEFT_TYPE_TO_CONFIG_MAPPING, QuanTAConfig),
               (mapping.PEFT_TYPE_TO_TUNER_MAPPING, QuanTAModel),
               (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, QuanTAModel.prefix))
    for table, value in entries:
        if table.get(QUANTA, value) is not value:
            raise RuntimeError(f"PEFT already has a method called {PEFT_TYPE_NAME!r} "
                               f"({table[QUANTA]!r}); cannot register qcircuit's QuanTA")
    taken = [k for k, v in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items()
             if v == QuanTAModel.prefix and k != QUANTA]
    if taken:
        raise RuntimeError(f"PEFT method {taken[0]} already uses the prefix {QuanTAModel.prefix!r}")
    for table, value in entries:
        table[QUANTA] = value
    guard.install()


register()
