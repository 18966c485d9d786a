"""The shape of ``adapter_config.json``: every field, its type and range, checked by one walk.

``check_config(config, where)`` takes the parsed JSON (any value at all) and either
returns or raises one ``QCError`` naming the file and the JSON path of the first bad
field (``$.layers["model.layers.0.mlp.up_proj"].gates[1][0]``). Nothing is trusted: a
list where a dict belongs, a missing key, a bool where an int belongs, an unknown key or
an unknown future ``format_version`` are all refused the same way, never as a raw
``KeyError``/``TypeError``. Besides types it checks what the fields must agree on: the
``frozen`` flags and layer states agree with ``options.init``. What needs the program or
the whole record (the tensor set the layers call for) is ``record.from_json``'s.

Format version 4 (this one) stores each layer as a sum of *branches* (one per ``apply``
rule matching it, ``layers[M].branches``), each with its circuit, gate shapes, frozen flag
and options, and the modules trained whole beside the circuits (``modules``: a task head;
``train`` statements, PEFT's ``modules_to_save``), each with its class and the shapes of
its tensors, saved as ``<module>.<tensor>``. ``upgrade`` is the one place where older
formats are read: version 3 (no trained modules) gains an empty ``modules``; version 2 (one
circuit per layer, options program-wide) is first rewritten as version 3 with one branch
per layer, whose tensor names are those of one-branch layers. Checkpoints without a
``format_version`` are version 1 and are refused: they cannot be verified.
"""
from __future__ import annotations

import json
import re
from qcircuit import QCError
from qcircuit.ir import MAX_DIM, MAX_QUDITS, OPTION_DEFAULTS, check_option

FORMAT = "qcircuit-adapter"
FORMAT_VERSION = 4
READS_VERSIONS = (2, 3, 4)
TOP_KEYS = ("format", "format_version", "qcircuit_version", "program", "options", "model",
            "layers", "modules", "tensors")
#: what PEFT's ``save_pretrained`` adds to a QuanTA config: bookkeeping that qcircuit's own
#: reader ignores (``peft_type`` must name QuanTA)
PEFT_KEYS = ("peft_type", "task_type", "peft_version", "auto_mapping", "base_model_name_or_path",
             "revision", "inference_mode", "seed", "target_modules", "modules_to_save")
PEFT_TYPE = "QUANTA"
RECORD_KEYS = ("kind", "in", "out", "state", "branches")
BRANCH_KEYS = ("circuit", "qc", "gates", "frozen") + tuple(OPTION_DEFAULTS)
V2_RECORD_KEYS = ("kind", "in", "out", "circuit", "qc", "gates", "frozen", "state")
TENSOR_KEYS = ("dtype", "shape", "sha256")
MODEL_KEYS = ("class", "config_class", "dtype")       # always there (values may be null)
#: config fields stored where the model has them
IDENTITY_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "vocab_size", "n_embd", "n_layer")
KINDS = ("linear", "conv1d")
STATES = ("unfolded", "folded")
TENSOR_DTYPES = ("float32", "float64")  # gates train in float32 (float64 on float64 layers)
#: a trained module's tensors keep the model's dtype
MODULE_DTYPES = ("float16", "bfloat16", "float32", "float64")
MODULE_KEYS = ("class", "tensors")
MAX_TENSOR_DIMS = 8
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+){0,16}")
MAX_FEATURES = 2**31
MAX_TEXT = 1 << 20                      # a circuit's name or a version string, not a program
MAX_MODULE_NAME = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}")


def branch_tensor_names(module: str, circuit: str, branches: int, gates: int,
                        frozen: bool) -> dict[str, tuple[str, int]]:
    """The key scheme: tensor name -> (``"adapter"`` or ``"frozen"``, gate index) for one
    branch of a layer with ``branches`` branches. A one-branch layer stores
    ``<module>.gates.<i>`` and ``<module>.init_gates.<i>``; a sum stores
    ``<module>.<circuit>.gates.<i>`` and ``<module>.<circuit>.init_gates.<i>``."""
    stem = module if branches == 1 else f"{module}.{circuit}"
    out = {f"{stem}.gates.{i}": ("adapter", i) for i in range(gates)}
    if frozen:
        out.update({f"{stem}.init_gates.{i}": ("frozen", i) for i in range(gates)})
    return out


def upgrade(config: object) -> object:
    """An older config rewritten as this version: version 3 gains an empty ``modules`` (it
    trained none); version 2 is first rewritten as version 3 (one branch per layer, with the
    program's options). Anything else is returned as it is, for ``check_config`` to judge.
    Only the shape of the records changes: tensor names and hashes stay valid."""
    config = _upgrade_2(config)
    if isinstance(config, dict) and config.get("format_version") == 3 and "modules" not in config:
        return {**config, "format_version": 4, "modules": {}}
    return config


def _upgrade_2(config: object) -> object:
    """Version 2 (one circuit per layer) as version 3 (branches)."""
    if not (isinstance(config, dict) and config.get("format_version") == 2
            and isinstance(config.get("layers"), dict) and isinstance(config.get("options"), dict)):
        return config
    options = {k: config["options"].get(k, v) for k, v in OPTION_DEFAULTS.items()}
    layers = {}
    for name, rec in config["layers"].items():
        if not isinstance(rec, dict) or set(rec) != set(V2_RECORD_KEYS):
            return config   # malformed: check_config names the field as version 3 sees it
        branch = {k: rec[k] for k in ("circuit", "qc", "gates", "frozen")}
        layers[name] = {"kind": rec["kind"], "in": rec["in"], "out": rec["out"],
                        "state": rec["state"], "branches": [{**branch, **options}]}
    return {**config, "format_version": 3, "layers": layers}


def check_config(config: object, where: str) -> None:
    """Refuse (``QCError``) any ``config`` that is not a well-formed version-3 config."""
    root = _dict(config, "$", where)
    fmt = root.get("format")
    if fmt != FORMAT:
        raise QCError(f"{where} is not a qcircuit adapter config "
                      f"(expected \"format\": \"{FORMAT}\", got {_show(fmt)})")
    version = root.get("format_version")
    if version is None:
        raise QCError(f"{where} has no format_version: it was saved by qcircuit 0.1 without "
                      f"tensor hashes and cannot be verified; save the adapter again")
    if _is_int(version) and version > FORMAT_VERSION:
        raise QCError(f"{where} has format_version {version}, newer than this qcircuit reads "
                      f"({FORMAT_VERSION}): upgrade qcircuit to load it")
    if version not in READS_VERSIONS or not _is_int(version):
        _bad(where, "$.format_version", f"{FORMAT_VERSION}", version)
    keys = TOP_KEYS if version == FORMAT_VERSION else tuple(k for k in TOP_KEYS if k != "modules")
    _exact_keys(root, keys, "$", where, optional=PEFT_KEYS)   # older formats train no modules
    if root.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
        _bad(where, "$.peft_type", json.dumps(PEFT_TYPE), root["peft_type"])
    _text(root["qcircuit_version"], "$.qcircuit_version", where)
    if not isinstance(root["program"], str):
        _bad(where, "$.program", "a string (.qc text)", root["program"])
    _check_options(root["options"], where)
    _check_model(root["model"], where)
    layers = _dict(root["layers"], "$.layers", where)
    if not layers:
        raise QCError(f"{where}: $.layers: a checkpoint adapts at least one layer")
    for name, rec in layers.items():
        _check_record(name, rec, f"$.layers[{_key(name)}]", where)
    _check_agreement(layers, where)
    modules = _dict(root.get("modules", {}), "$.modules", where)
    for name, rec in modules.items():
        _check_module(name, rec, f"$.modules[{_key(name)}]", where)
    held = {f"{m}.{t}" for m, rec in modules.items() for t in rec["tensors"]}
    tensors = _dict(root["tensors"], "$.tensors", where)
    for name, entry in tensors.items():
        _check_tensor_entry(entry, f"$.tensors[{_key(name)}]", where,
                            MODULE_DTYPES if name in held else TENSOR_DTYPES)


# --- fields ------------------------------------------------------------------------------
def _check_options(value: object, where: str) -> dict:
    options = _dict(value, "$.options", where)
    _exact_keys(options, tuple(OPTION_DEFAULTS), "$.options", where)
    for key, v in options.items():
        if isinstance(v, (dict, list)):
            _bad(where, f"$.options.{key}", "a string or a number", v)
        try:
            check_option(key, v)
        except QCError as e:
            raise QCError(f"{where}: $.options.{key}: {e.one_line()}") from None
    return options


def _check_model(value: object, where: str) -> None:
    model = _dict(value, "$.model", where)
    for key in MODEL_KEYS:
        if key not in model:
            raise QCError(f"{where}: $.model: key {json.dumps(key)} is missing")
    _text(model["class"], "$.model.class", where)
    for key, v in model.items():
        path = f"$.model.{key}"
        if key in ("config_class", "dtype"):
            if v is not None:
                _text(v, path, where)
        elif key in IDENTITY_KEYS:
            if not (_is_int(v) or isinstance(v, str) and len(v) <= MAX_TEXT):
                _bad(where, path, "an integer or a string", v)
        elif key != "class":
            raise QCError(f"{where}: $.model: unknown key {json.dumps(key)[:60]} (expected "
                          f"only {', '.join(MODEL_KEYS + IDENTITY_KEYS)})")


def _check_record(name: str, value: object, path: str, where: str) -> None:
    if not name or len(name) > MAX_MODULE_NAME:
        raise QCError(f"{where}: {path}: a module name has 1 to {MAX_MODULE_NAME} characters")
    rec = _dict(value, path, where)
    _exact_keys(rec, RECORD_KEYS, path, where)
    if rec["kind"] not in KINDS:
        _bad(where, f"{path}.kind", " or ".join(map(json.dumps, KINDS)), rec["kind"])
    for key in ("in", "out"):
        _positive(rec[key], f"{path}.{key}", MAX_FEATURES, where)
    if rec["state"] not in STATES:
        _bad(where, f"{path}.state", " or ".join(map(json.dumps, STATES)), rec["state"])
    branches = _list(rec["branches"], f"{path}.branches", where)
    if not branches:
        raise QCError(f"{where}: {path}.branches: a layer has at least one branch")
    seen = set()
    for k, branch in enumerate(branches):
        _check_branch(branch, f"{path}.branches[{k}]", where)
        if branch["circuit"] in seen:
            raise QCError(f"{where}: {path}.branches[{k}].circuit: circuit "
                          f"{json.dumps(branch['circuit'])[:60]} appears twice in one layer")
        seen.add(branch["circuit"])


def _check_branch(value: object, path: str, where: str) -> None:
    rec = _dict(value, path, where)
    _exact_keys(rec, BRANCH_KEYS, path, where)
    _text(rec["circuit"], f"{path}.circuit", where)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rec["circuit"]):
        _bad(where, f"{path}.circuit", "a circuit name", rec["circuit"])
    if not isinstance(rec["qc"], str):
        _bad(where, f"{path}.qc", "a string (.qc text)", rec["qc"])
    _shapes(rec["gates"], f"{path}.gates", where)
    if not isinstance(rec["frozen"], bool):
        _bad(where, f"{path}.frozen", "true or false", rec["frozen"])
    for key in OPTION_DEFAULTS:
        if isinstance(rec[key], (dict, list)):
            _bad(where, f"{path}.{key}", "a string or a number", rec[key])
        try:
            check_option(key, rec[key])
        except QCError as e:
            raise QCError(f"{where}: {path}.{key}: {e.one_line()}") from None


def _shapes(value: object, path: str, where: str) -> None:
    gates = _list(value, path, where)
    if not gates:
        raise QCError(f"{where}: {path}: a circuit has at least one gate")
    for i, shape in enumerate(gates):
        _shape(shape, f"{path}[{i}]", where)


def _shape(value: object, path: str, where: str) -> None:
    dims = _list(value, path, where)
    if not 1 <= len(dims) <= 2 * MAX_QUDITS:
        _bad(where, path, f"a gate shape of 1 to {2 * MAX_QUDITS} dims", value)
    for j, d in enumerate(dims):
        _positive(d, f"{path}[{j}]", MAX_DIM, where)


def _check_module(name: str, value: object, path: str, where: str) -> None:
    """A trained module: its class name and its tensors' shapes (``{"weight": [3, 384]}``)."""
    if not name or len(name) > MAX_MODULE_NAME:
        raise QCError(f"{where}: {path}: a module name has 1 to {MAX_MODULE_NAME} characters")
    rec = _dict(value, path, where)
    _exact_keys(rec, MODULE_KEYS, path, where)
    _text(rec["class"], f"{path}.class", where)
    tensors = _dict(rec["tensors"], f"{path}.tensors", where)
    if not tensors:
        raise QCError(f"{where}: {path}.tensors: a trained module has at least one tensor")
    for local, shape in tensors.items():
        if not _TENSOR_NAME.fullmatch(local):
            _bad(where, f"{path}.tensors", "tensor names like weight or dense.bias", local)
        _module_shape(shape, f"{path}.tensors[{_key(local)}]", where)


def _module_shape(value: object, path: str, where: str) -> None:
    dims = _list(value, path, where)
    if len(dims) > MAX_TENSOR_DIMS:
        _bad(where, path, f"a shape of at most {MAX_TENSOR_DIMS} dims", value)
    for j, d in enumerate(dims):
        _positive(d, f"{path}[{j}]", MAX_FEATURES, where)


def _check_tensor_entry(value: object, path: str, where: str,
                        dtypes: tuple[str, ...] = TENSOR_DTYPES) -> None:
    entry = _dict(value, path, where)
    _exact_keys(entry, TENSOR_KEYS, path, where)
    if entry["dtype"] not in dtypes:
        _bad(where, f"{path}.dtype", " or ".join(map(json.dumps, dtypes)), entry["dtype"])
    if dtypes is MODULE_DTYPES:
        _module_shape(entry["shape"], f"{path}.shape", where)
    else:
        _shape(entry["shape"], f"{path}.shape", where)
    if not (isinstance(entry["sha256"], str) and _SHA256.fullmatch(entry["sha256"])):
        _bad(where, f"{path}.sha256", "64 lowercase hex digits", entry["sha256"])


# --- agreement between fields ------------------------------------------------------------
def _check_agreement(layers: dict, where: str) -> None:
    """A ``freeze_one`` branch keeps a frozen copy, a ``zero_last`` one none; only a layer
    with a frozen copy can have it folded into the base weight."""
    for name, rec in layers.items():
        path = f"$.layers[{_key(name)}]"
        for k, b in enumerate(rec["branches"]):
            if b["frozen"] != (b["init"] == "freeze_one"):
                raise QCError(f"{where}: {path}.branches[{k}].frozen is "
                              f"{json.dumps(b['frozen'])} but its init is {json.dumps(b['init'])}")
        if rec["state"] == "folded" and not any(b["frozen"] for b in rec["branches"]):
            raise QCError(f"{where}: {path}.state is \"folded\" but the layer has no "
                          f"frozen initial gates to fold")


# --- primitives --------------------------------------------------------------------------
def _show(value: object) -> str:
    """A short, safe rendering of a JSON value for an error message."""
    kind = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), "?")
    if value is None:
        return kind
    if isinstance(value, (dict, list)):
        return f"{kind} of {len(value)} entries"
    text = json.dumps(value)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


def _key(name: str) -> str:
    """A dict key as it appears in a JSON path (quoted, at most 200 characters)."""
    text = json.dumps(name)
    return text if len(text) <= 200 else text[:197] + "..."


def _bad(where: str, path: str, expected: str, value: object):
    raise QCError(f"{where}: {path}: expected {expected}, got {_show(value)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dict(value: object, path: str, where: str) -> dict:
    if not isinstance(value, dict):
        _bad(where, path, "an object", value)
    return value


def _list(value: object, path: str, where: str) -> list:
    if not isinstance(value, list):
        _bad(where, path, "an array", value)
    return value


def _text(value: object, path: str, where: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        _bad(where, path, "a non-empty string", value)


def _positive(value: object, path: str, high: int, where: str) -> None:
    if not (_is_int(value) and 1 <= value <= high):
        _bad(where, path, f"an integer from 1 to {high}", value)


def _exact_keys(obj: dict, keys: tuple[str, ...], path: str, where: str,
                optional: tuple[str, ...] = ()) -> None:
    for key in keys:
        if key not in obj:
            raise QCError(f"{where}: {path}: key {json.dumps(key)} is missing")
    for key in obj:
        if key not in keys and key not in optional:
            raise QCError(f"{where}: {path}: unknown key {json.dumps(key)[:60]} "
                          f"(expected only {', '.join(keys)})")
