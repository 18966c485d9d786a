"""``qcompile``: what a ``.qc`` adapter costs on a model, offline, in seconds.

    qcompile adapter.qc --model llama-2-7b [--json] [--draw] [--out DIR] [--seed N]
    qcompile --list-models

The model is an embedded name (built on the meta device: shapes only) or a local
directory with ``config.json``. User errors (missing or bad files, unknown models,
circuits that do not fit, unwritable output) print one line
``qcompile: error: …`` on stderr and exit with status 2; warnings (a circuit that is
not universal) go to stderr too, so stdout holds only the report. Nothing touches the
network: embedded models are built from their stored configs with ``from_config``, and
directories are read with ``local_files_only=True``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from qcircuit.errors import QCError
from qcircuit.ir import OPTION_DEFAULTS
from qcircuit.parser import parse_file

from .adapter import attach
from .bind import bind
from .models import EMBEDDED_MODELS, embedded_config_dict, load_model
from .report import build_report, format_table, not_universal, to_json

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompile", description="Report what a QuanTA adapter (.qc) costs on a "
                "model: matched layers, circuit dims, parameters, FLOPs per token, rank bound.")
    p.add_argument("file", nargs="?", help="the adapter's .qc file")
    p.add_argument("--model", "-m", help="embedded model name (see --list-models) or a local "
                   "directory with config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--draw", action="store_true", help="add each circuit's diagram")
    p.add_argument("--out", metavar="DIR", help="write an initialised adapter checkpoint to DIR")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial gates of --out "
                   "(default 0)")
    p.add_argument("--list-models", action="store_true", help="list the embedded models and exit")
    return p


def list_models() -> str:
    """One line per embedded model: name, architecture, main sizes."""
    lines = []
    for name in EMBEDDED_MODELS:
        c = embedded_config_dict(name)
        lines.append(f"{name:<18} {c['architectures'][0]:<20} hidden {c['hidden_size']}, "
                     f"{c['num_hidden_layers']} layers, intermediate {c['intermediate_size']}")
    return "\n".join(lines)


def diagrams(report) -> dict[tuple, str]:
    """``(circuit name, circuit) -> diagram`` for every distinct bound circuit."""
    out: dict[tuple, str] = {}
    for r in report.rows:
        out.setdefault((r.circuit_name, r.circuit), r.circuit.diagram())
    return out


def run(args: argparse.Namespace) -> int:
    """Do the work; raise QCError or OSError on user errors."""
    if args.list_models:
        print(list_models())
        return 0
    if not args.file:
        raise QCError("no .qc file given", expected="qcompile FILE.qc --model NAME")
    if not args.model:
        raise QCError("no model given", expected="--model NAME (see --list-models) or a directory")
    program = parse_file(args.file)
    loaded = load_model(args.model)
    targets = bind(loaded.model, program)
    report = build_report(loaded.name, type(loaded.model).__name__, loaded.total_params,
                          targets, {k: program.option(k) for k in OPTION_DEFAULTS})
    for warning in not_universal(report):
        print(f"qcompile: warning: {warning}", file=sys.stderr)
    if args.out:
        _write_checkpoint(loaded.model, program, args.out, args.seed)
    pictures = diagrams(report) if args.draw else {}
    if args.json:
        obj = to_json(report)
        if args.draw:
            for row, entry in zip(report.rows, obj["targets"]):
                entry["diagram"] = pictures[(row.circuit_name, row.circuit)]
        if args.out:
            obj["out"] = os.path.abspath(args.out)
        print(json.dumps(obj, indent=2))
        return 0
    print(format_table(report))
    for (name, circuit), picture in pictures.items():
        print(f"\ncircuit {name}: {circuit.in_features} -> {circuit.out_features} features, "
              f"{circuit.num_params:,} parameters\n{picture}")
    if args.out:
        print(f"\nwrote an initialised adapter checkpoint to {args.out}")
    return 0


def _write_checkpoint(model, program, out: str, seed: int) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise QCError(f"--out {out!r} exists and is not a directory")
    attach(model, program, seed=seed).save(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qcompile``; returns the exit status (0, or 2 on a user error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    _quiet_transformers()
    try:
        return run(args)
    except BrokenPipeError:  # e.g. `qcompile … | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except QCError as e:
        print(f"qcompile: error: {e.one_line()}", file=sys.stderr)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"qcompile: error: {where}{e.strerror or e}", file=sys.stderr)
    return EXIT_USAGE


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
