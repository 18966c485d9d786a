"""``qcompile``: what a ``.qc`` adapter costs on a model, offline, in seconds.

    qcompile adapter.qc --model llama-2-7b [--json] [--draw] [--explain [--tokens N]] [--seed N]
                        [--out DIR [--force] [--max-bytes N]]
    qcompile --list-models
    qcompile import-reference CHECKPOINT --model NAME_OR_DIR --out DIR [--force]

The model is an embedded name (built on the meta device: shapes only) or a local
directory with ``config.json``. User errors (missing or bad files, unknown models, bad
configs, circuits that do not fit, an adapter over ``--max-bytes``, unwritable output, a
full disk, running out of memory) print one line ``qcompile: error: …`` on stderr and
exit with status 2; Ctrl-C prints ``qcompile: interrupted`` and exits 130, SIGTERM
``qcompile: terminated`` and 143, both after the checkpoint writer has cleaned up.
Any other exception is a bug in qcircuit and keeps its traceback. Warnings (a circuit
that is not universal, one nearly as large as its layer: ``oversize.py``) go to stderr
too, so stdout holds only the report. Nothing touches the network: embedded models are
built from their stored configs with ``from_config``, and directories are read with
``local_files_only=True``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from typing import Sequence

import torch
from safetensors import SafetensorError

from qcircuit.errors import QCError
from qcircuit.ir import OPTION_DEFAULTS
from qcircuit.parser import parse_file

from .adapter import attach
from .bind import bind
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .console import interrupt_received
from .models import EMBEDDED_MODELS, embedded_config_dict, load_model
from .oversize import NearFullSizeWarning, near_full_size
from .report import (build_report, checkpoint_bytes, format_table, not_universal, options_text,
                     rank_text, to_json)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
DEFAULT_MAX_BYTES = 1 << 30  #: --out refuses a checkpoint larger than this by default
MAX_SEED = 2**64 - 1  #: torch.Generator.manual_seed takes 0 … 2**64 − 1
GATE_BYTES = 4  #: qcompile builds models in float32, so the gates are float32

_TorchOutOfMemory = getattr(torch, "OutOfMemoryError", MemoryError)  # an accelerator's


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks (temp files) run."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: ``qcompile --help`` ends with the subcommands (argparse's own subparsers would make the
#: first positional argument, the .qc file, a subcommand name)
SUBCOMMANDS = """subcommands:
  import-reference CHECKPOINT --model NAME_OR_DIR --out DIR [--force]
                        convert a checkpoint of the QuanTA reference implementation
                        into an adapter (qcompile import-reference --help)"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompile", description="Report what a QuanTA adapter (.qc) costs on a "
                "model: matched layers, circuit dims,\nparameters, FLOPs per token, rank bound.",
                epilog=SUBCOMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", help="the adapter's .qc file")
    p.add_argument("--model", "-m", help="embedded model name (see --list-models) or a local "
                   "directory with config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--draw", action="store_true", help="add each circuit's diagram (a "
                   "layer's several circuits one under the other, summed)")
    p.add_argument("--out", metavar="DIR", help="write an initialised adapter checkpoint to DIR")
    p.add_argument("--force", action="store_true", help="let --out replace the adapter "
                   "checkpoint already in DIR")
    p.add_argument("--max-bytes", type=_count, default=DEFAULT_MAX_BYTES, metavar="N",
                   help="refuse an --out checkpoint over N bytes (gates and frozen copies; "
                   f"default {DEFAULT_MAX_BYTES:,})")
    p.add_argument("--seed", type=_seed, default=0, help="seed for the initial gates of --out "
                   "(0 to 2**64-1, default 0)")
    p.add_argument("--explain", action="store_true", help="show how each circuit's forward "
                   "runs here: candidate routes, predicted and measured times, the winner")
    p.add_argument("--tokens", type=_count, default=512, metavar="N",
                   help="token count for --explain (default 512)")
    p.add_argument("--list-models", action="store_true", help="list the embedded models and exit")
    return p


def build_import_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompile import-reference", description="Convert a checkpoint of the "
                "QuanTA reference implementation (a Trainer checkpoint: pytorch_model.bin, "
                ".safetensors, or a checkpoint-* directory) into a qcircuit/PEFT adapter for "
                "the original base model.")
    p.add_argument("checkpoint", help="the reference checkpoint (file or directory)")
    p.add_argument("--model", "-m", required=True, help="embedded model name or a local "
                   "directory with config.json (shapes only: no weights are read)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the adapter")
    p.add_argument("--force", action="store_true", help="replace an adapter already in DIR")
    return p


def run_import(args: argparse.Namespace) -> int:
    """``qcompile import-reference``: read, convert, write; raise QCError on user errors."""
    from .reference import import_reference
    check_out(args.out, args.force)
    adapted = import_reference(load_model(args.model).model, args.checkpoint)
    save_checkpoint(adapted, args.out)
    print(f"wrote {len(adapted.layers)} adapted layers to {args.out}")
    return 0


def _seed(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is out of range (0 to 2**64-1)")
    return value


def _count(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def list_models() -> str:
    """One line per embedded model: name, architecture, main sizes."""
    lines = []
    for name in EMBEDDED_MODELS:
        c = embedded_config_dict(name)
        lines.append(f"{name:<18} {c['architectures'][0]:<20} hidden {c['hidden_size']}, "
                     f"{c['num_hidden_layers']} layers, intermediate {c['intermediate_size']}")
    return "\n".join(lines)


def per_circuit(report, describe) -> dict[tuple, str]:
    """``(circuit name, circuit) -> describe(circuit)`` for every distinct bound circuit."""
    out: dict[tuple, str] = {}
    for r in report.rows:
        key = (r.circuit_name, r.circuit)
        if key not in out:
            out[key] = describe(r.circuit)
    return out


def diagrams(report) -> dict[tuple, str]:
    return per_circuit(report, lambda c: c.diagram())


def explanations(report, tokens: int) -> dict[tuple, str]:
    """How each distinct circuit's forward runs at ``tokens`` on this machine's CPU: the
    candidate routes, predicted and measured times, the winner."""
    from qcircuit.compiler import compile as compile_circuit
    return per_circuit(report, lambda c: compile_circuit(c).explain(tokens))


def circuit_title(row) -> str:
    """``circuit lora (init = zero_last): 64 -> 64 features, 1,024 parameters``."""
    own = f" ({options_text(row.own_options)})" if row.own_options else ""
    return (f"circuit {row.circuit_name}{own}: {row.circuit.in_features} -> "
            f"{row.circuit.out_features} features, {row.circuit.num_params:,} parameters")


def drawing_text(report, pictures: dict[tuple, str]) -> str:
    """``--draw``: each distinct circuit under its title, once; a layer group with several
    branches (once per distinct sum) as its title, then its branches one under the other
    with ``+`` between."""
    blocks, seen = [], set()
    for g in report.groups:
        keys = [(r.circuit_name, r.circuit, tuple(r.own_options.items())) for r in g.branches]
        key = keys[0] if len(keys) == 1 else tuple(keys)
        if key in seen:
            continue
        seen.update([key, *keys])
        parts = [f"{circuit_title(r)}\n{pictures[(r.circuit_name, r.circuit)]}"
                 for r in g.branches]
        if len(parts) == 1:
            blocks.append(parts[0])
            continue
        blocks.append(f"{g.label}: the sum of {len(parts)} circuits on {len(g.modules)} "
                      f"modules, {g.in_features} -> {g.out_features} features, "
                      f"{g.params:,} parameters, rank bound "
                      f"{rank_text(g.rank_bound, g.full_rank)}\n\n" + "\n\n+\n\n".join(parts))
    return "".join(f"\n{b}\n" for b in blocks)


def explain_text(report, texts: dict[tuple, str], tokens: int) -> str:
    """``--explain``: each distinct circuit once, in branch order; a branch of a sum says
    which one."""
    lines, seen = [], set()
    for g in report.groups:
        for i, r in enumerate(g.branches, 1):
            if (r.circuit_name, r.circuit) in seen:
                continue
            seen.add((r.circuit_name, r.circuit))
            where = f", branch {i} of {len(g.branches)} on {g.label}" if len(g.branches) > 1 else ""
            lines.append(f"\ncircuit {r.circuit_name} at {tokens} tokens{where}:\n"
                         f"{texts[(r.circuit_name, r.circuit)]}\n")
    return "".join(lines)


def run(args: argparse.Namespace) -> int:
    """Do the work; raise QCError or OSError on user errors."""
    if args.list_models:
        print(list_models())
        return 0
    if not args.file:
        raise QCError("no .qc file given", expected="qcompile FILE.qc --model NAME")
    if not args.model:
        raise QCError("no model given", expected="--model NAME (see --list-models) or a directory")
    if args.out is not None:
        check_out(args.out, args.force)
    program = parse_file(args.file)
    loaded = load_model(args.model)
    targets = bind(loaded.model, program)
    report = build_report(loaded.name, type(loaded.model).__name__, loaded.total_params,
                          targets, {k: program.option(k) for k in OPTION_DEFAULTS})
    if args.out is not None:
        size = checkpoint_bytes(report, GATE_BYTES)
        if size > args.max_bytes:
            raise QCError(f"--out: the checkpoint would hold {size:,} bytes of gates, over the "
                          f"cap of {args.max_bytes:,}", expected="a smaller adapter, or "
                          "--max-bytes N to raise the cap")
    for warning in not_universal(report) + near_full_size(targets):   # a refusal is one line
        print(f"qcompile: warning: {warning}", file=sys.stderr)
    if args.out is not None:
        write_checkpoint(loaded.model, program, args.out, args.seed)
    pictures = diagrams(report) if args.draw else {}
    if args.json:
        obj = to_json(report)
        if args.draw:
            for row, entry in zip(report.rows, obj["targets"]):
                entry["diagram"] = pictures[(row.circuit_name, row.circuit)]
        if args.out:
            obj["out"] = os.path.abspath(args.out)
        if args.explain:
            texts = explanations(report, args.tokens)
            for row, entry in zip(report.rows, obj["targets"]):
                entry["explain"] = texts[(row.circuit_name, row.circuit)]
        print(json.dumps(obj, indent=2))
        return 0
    print(format_table(report))
    if args.draw:
        print(drawing_text(report, pictures), end="")
    if args.explain:
        print(explain_text(report, explanations(report, args.tokens), args.tokens), end="")
    if args.out:
        print(f"\nwrote an initialised adapter checkpoint to {args.out}")
    return 0


def check_out(out: str, force: bool) -> None:
    """Refuse an ``--out`` that would lose something: an empty name, a file, a directory
    with other things in it, or another adapter's checkpoint (unless ``force``)."""
    if not out.strip():
        raise QCError("--out needs a directory", expected="--out DIR")
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise QCError(f"--out {out!r} exists and is not a directory")
    entries = set(os.listdir(out))
    if entries & {CONFIG_NAME, WEIGHTS_NAME}:
        if not force:
            raise QCError(f"--out {out!r} already holds an adapter checkpoint",
                          expected="another directory, or --force to replace it")
    elif entries:
        raise QCError(f"--out {out!r} is not empty and holds no adapter checkpoint "
                      f"({len(entries)} other entries): refusing to write into it",
                      expected="a new or empty directory")


def write_checkpoint(model, program, out: str, seed: int) -> None:
    """Attach the program to ``model`` with ``seed`` and save the adapter to ``out``
    (``attach``'s size warnings are the report's, already printed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NearFullSizeWarning)
        adapted = attach(model, program, seed=seed)
    save_checkpoint(adapted, out)


def save_checkpoint(adapted, out: str) -> None:
    """``adapted.save(out)``, with write failures as a QCError naming ``out``."""
    try:
        adapted.save(out)
    except OSError as e:
        raise QCError(f"cannot write the checkpoint to {out}: {e.strerror or e}") from None
    except SafetensorError as e:  # safetensors reports I/O errors (a full disk) as its own
        raise QCError(f"cannot write the checkpoint to {out}: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qcompile``; returns the exit status: 0; 2 on a user error (one
    line on stderr); 130 on Ctrl-C; 143 on SIGTERM."""
    argv = list(sys.argv[1:] if argv is None else argv)
    importing = argv[:1] == ["import-reference"]
    try:
        if importing:
            args, work = build_import_parser().parse_args(argv[1:]), run_import
        else:
            args, work = build_parser().parse_args(argv), run
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:  # signal handlers can only be set there
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _quiet_transformers()
        return work(args)
    except BaseException as e:  # noqa: BLE001 - each kind becomes its exit status below
        return _failure(e)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _failure(e: BaseException) -> int:
    """The exit status for ``e`` (one line on stderr), or ``e`` raised again if unexpected.
    After a Ctrl-C whatever ``e`` is counts as the interrupt: a library may turn the
    ``KeyboardInterrupt`` into its own error (transformers' lazy imports do)."""
    if interrupt_received() or isinstance(e, KeyboardInterrupt):
        _say("interrupted")
        return EXIT_INTERRUPTED
    if isinstance(e, Terminated):
        _say("terminated")
        return EXIT_TERMINATED
    if isinstance(e, BrokenPipeError):  # e.g. `qcompile … | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    if isinstance(e, QCError):
        _say(f"error: {e.one_line()}")
    elif isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        _say(f"error: {where}{e.strerror or e}")
    elif isinstance(e, (MemoryError, _TorchOutOfMemory)):
        _say("error: out of memory (try a smaller adapter or model)")
    else:
        raise e
    return EXIT_USAGE


def _say(text: str) -> None:
    print(f"qcompile: {text}", file=sys.stderr)


def _raise_terminated(signum, frame):
    raise Terminated


def _quiet_transformers() -> None:
    """No progress bars or info logs from transformers on our stderr."""
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":
    sys.exit(main())
