"""A model's ``config.json``, read and checked before transformers sees it.

A local directory's ``config.json`` is user input: it is read only if it is a regular
file of at most ``MAX_CONFIG_BYTES``, must be UTF-8 JSON nested at most ``MAX_DEPTH``
levels, and passes a small schema — ``model_type`` a known transformers type,
``architectures`` a list of names, every size field (``hidden_size``, ``n_layer``, …,
at any depth, so sub-configs too) a whole number from 1 (0 for two that allow it) to
its cap, or a list or object of such numbers — and an upper estimate of the parameter
count stays under ``MAX_PARAMS``. Everything here raises
``QCError`` naming the file, so a bad config is refused in milliseconds instead of
failing (or running for minutes) inside transformers.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Mapping

from qcircuit.errors import QCError, with_article

MAX_CONFIG_BYTES = 1 << 20  #: a published config.json is a few KiB
MAX_DEPTH = 32  #: nesting of objects and lists (real configs: 3 or 4)
MAX_LAYERS = 512  #: per stack (the largest published models have ~130)
MAX_WIDTH = 1 << 20  #: hidden, intermediate, vocabulary and head sizes
MAX_POSITIONS = 1 << 24  #: max_position_embeddings and the like
MAX_PARAMS = 1 << 42  #: ~4.4e12, ten times the largest published dense model

_LAYER_KEYS = frozenset({"num_hidden_layers", "n_layer", "n_layers", "num_layers",
                         "encoder_layers", "decoder_layers", "num_encoder_layers",
                         "num_decoder_layers"})
_POSITION_KEYS = frozenset({"max_position_embeddings", "n_positions", "n_ctx"})
_WIDTH_KEYS = frozenset({
    "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "type_vocab_size", "n_embd", "n_head", "n_inner",
    "d_model", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "encoder_attention_heads",
    "decoder_attention_heads", "num_local_experts", "num_experts_per_tok",
    "moe_intermediate_size", "num_heads", "d_ff", "d_kv"})
_MAY_BE_ZERO = {"type_vocab_size": 0, "head_dim": 0}  # DeBERTa: none; 0: derive it
#: every size field the schema knows -> its cap (None is allowed: transformers' default)
SIZE_CAPS: dict[str, int] = {**{k: MAX_LAYERS for k in _LAYER_KEYS},
                             **{k: MAX_POSITIONS for k in _POSITION_KEYS},
                             **{k: MAX_WIDTH for k in _WIDTH_KEYS}}


def read_config_file(path: Path) -> dict[str, Any]:
    """The checked fields of the ``config.json`` at ``path`` (QCError when it is bad)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise QCError(f"model directory {str(path.parent)!r} has no config.json") from None
    if not stat.S_ISREG(info.st_mode):
        raise QCError(f"{path}: not a regular file")
    if info.st_size > MAX_CONFIG_BYTES:
        raise QCError(f"{path}: {info.st_size:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte "
                      "cap for a config.json")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)  # the file may have grown since stat
    if len(data) > MAX_CONFIG_BYTES:
        raise QCError(f"{path}: over the {MAX_CONFIG_BYTES:,}-byte cap for a config.json")
    return check_config(parse_config_text(data, str(path)), str(path))


def parse_config_text(data: bytes, where: str) -> Any:
    """UTF-8 JSON to Python values; QCError for bad encoding, syntax or nesting."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QCError(f"{where}: not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise QCError(f"{where}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except RecursionError:
        raise QCError(f"{where}: JSON nested too deeply (the cap is {MAX_DEPTH} levels)") from None


def check_config(fields: Any, where: str) -> dict[str, Any]:
    """Check ``fields`` against the schema (module docstring); return them unchanged."""
    if not isinstance(fields, dict):
        raise QCError(f"{where}: expected a JSON object, got {with_article(type(fields).__name__)}")
    model_type = fields.get("model_type")
    if not isinstance(model_type, str) or model_type not in _known_model_types():
        raise QCError(f"{where}: unknown model_type {model_type!r}",
                      expected="a model type transformers knows, e.g. 'llama' or 'bert'")
    archs = fields.get("architectures")
    if archs is not None and not (isinstance(archs, list)
                                  and all(isinstance(a, str) and a for a in archs)):
        raise QCError(f"{where}: architectures must be a list of class names, got {archs!r:.80}")
    for key, value in _walk(fields, where):
        _check_size(key, value, where)
    estimate = estimated_params(fields)
    if estimate > MAX_PARAMS:
        raise QCError(f"{where}: about {estimate:.3g} parameters, over the cap of "
                      f"{MAX_PARAMS:.3g}")
    return fields


def estimated_params(fields: Mapping[str, Any]) -> int:
    """An upper-end estimate of a transformer's parameters from its top-level sizes:
    layers · (4·h² + 3·h·i) + 2·vocab·h (attention, a gated MLP, untied embeddings)."""
    def size(*keys: str, default: int) -> int:
        for k in keys:
            if isinstance(fields.get(k), int):
                return fields[k]
        return default

    h = size("hidden_size", "n_embd", "d_model", default=0)
    i = size("intermediate_size", "n_inner", "ffn_dim", default=4 * h)
    layers = max((v for k, v in fields.items() if k in _LAYER_KEYS and isinstance(v, int)),
                 default=0)
    vocab = size("vocab_size", default=0)
    return layers * (4 * h * h + 3 * h * i) + 2 * vocab * h


def _check_size(key: str, value: Any, where: str) -> None:
    """A size is a whole number from its minimum to its cap; a few model families give a
    list (one per stage) or an object (one per tower) of them."""
    cap = SIZE_CAPS.get(key)
    if cap is None or value is None:
        return
    low = _MAY_BE_ZERO.get(key, 1)
    for v in _members(value):
        whole = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
        if isinstance(v, bool) or not whole:
            raise QCError(f"{where}: {key} = {value!r:.40} is not a whole number",
                          expected=f"an integer from {low} to {cap:,}")
        if not low <= v <= cap:
            raise QCError(f"{where}: {key} = {value!r:.40} is out of range",
                          expected=f"an integer from {low} to {cap:,}")


def _members(value: Any) -> list:
    if isinstance(value, dict):
        return list(value.values())
    return value if isinstance(value, list) else [value]


def _walk(fields: dict, where: str):
    """``(key, value)`` of every object member at any depth; QCError past ``MAX_DEPTH``."""
    stack = [(fields, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise QCError(f"{where}: JSON nested too deeply (the cap is {MAX_DEPTH} levels)")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(node, dict):
                yield key, value
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1))


def _known_model_types():
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING
