"""``python -m tests.fuzz [--cases N] [--seed S] [--max-bytes B]``: run the fuzzer, print
its figures (inputs, errors by kind, slowest input, memory); exit 1 if a rule broke."""
from __future__ import annotations

import argparse
import sys

from .run import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-bytes", type=int, default=100_000)
    ap.add_argument("--time-limit", type=float, default=1.0, help="CPU seconds per case")
    args = ap.parse_args(argv)
    report = run(args.cases, seed=args.seed, max_bytes=args.max_bytes, time_limit=args.time_limit)
    print(f"qcircuit parser fuzz, seed {args.seed}, inputs up to {args.max_bytes} bytes")
    print("\n".join(report.lines()))
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
