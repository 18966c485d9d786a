"""Older checkpoint formats made from a current config, for the upgrade tests.

``as_format(config, 3)`` is the config as format 3 wrote it (no trained modules);
``as_format(config, 2)`` as format 2 did (one circuit per layer, options program-wide).
Both edit ``config`` in place; tensor names and hashes stay valid.
"""
from __future__ import annotations


def as_format(config: dict, version: int) -> dict:
    """``config`` (format 4, no trained modules) rewritten as format ``version``."""
    assert version in (2, 3) and not config.get("modules"), "formats 2 and 3 train no modules"
    config.pop("modules", None)
    config["format_version"] = version
    if version == 2:
        for rec in config["layers"].values():
            branch = rec.pop("branches")[0]
            rec.update({k: branch[k] for k in ("circuit", "qc", "gates", "frozen")})
    return config
