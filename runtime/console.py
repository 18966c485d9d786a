"""The ``qcompile`` command's entry point: Ctrl-C is handled from its first line.

``cli.py`` imports torch and transformers, which takes seconds; a Ctrl-C during those
imports used to end in a traceback. This module imports nothing heavy (nor does the
package above it), installs the interrupt handling, and only then imports ``cli``: a
Ctrl-C at any moment from here on prints ``qcompile: interrupted`` and exits 130. The
first Ctrl-C raises ``KeyboardInterrupt``; later ones are ignored, so the clean-up it
starts (the checkpoint writer's temporary files) runs to the end and nothing else is
printed. A SIGINT inherited as ignored (a background job) stays ignored.
"""
from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 128 + signal.SIGINT   # 130, as a shell reports Ctrl-C


def _interrupt_once(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> int:
    """Run ``qcompile`` (``cli.main``) with Ctrl-C covered, imports included."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt_once)
    try:
        from .cli import main as cli_main
        return cli_main()
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
