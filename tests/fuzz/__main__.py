"""``python -m tests.fuzz [--cases N] [--seed S] [--max-bytes B] [--builder]``: run the fuzzer
(the parser's, or with ``--builder`` the builder API's), print its figures (inputs, errors
by kind, slowest input, memory); exit 1 if a rule broke."""
from __future__ import annotations

import argparse
import sys

from .builder import run_builder
from .run import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-bytes", type=int, default=100_000)
    ap.add_argument("--time-limit", type=float, default=1.0, help="CPU seconds per case")
    ap.add_argument("--builder", action="store_true", help="drive the builder API instead")
    args = ap.parse_args(argv)
    if args.builder:
        report = run_builder(args.cases, seed=args.seed, time_limit=args.time_limit)
        print(f"qcircuit builder fuzz, seed {args.seed}")
    else:
        report = run(args.cases, seed=args.seed, max_bytes=args.max_bytes,
                     time_limit=args.time_limit)
        print(f"qcircuit parser fuzz, seed {args.seed}, inputs up to {args.max_bytes} bytes")
    print("\n".join(report.lines()))
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
