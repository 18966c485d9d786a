"""The ``qcompile`` command's entry point: Ctrl-C is handled from its first line.

``cli.py`` imports torch and transformers, which takes seconds; a Ctrl-C during those
imports used to end in a traceback. This module imports nothing heavy (nor does the
package above it), installs the interrupt handling, and only then imports ``cli``: a
Ctrl-C at any moment from here on prints ``qcompile: interrupted`` and exits 130. The
first Ctrl-C raises ``KeyboardInterrupt``; later ones are ignored, so the clean-up it
starts (the checkpoint writer's temporary files) runs to the end and nothing else is
printed. A library may turn that ``KeyboardInterrupt`` into an error of its own
(transformers' lazy imports do), so what counts is whether the signal came
(``interrupt_received``), not the exception that arrives. A SIGINT inherited as ignored (a
background job) stays ignored.
"""
from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 128 + signal.SIGINT   # 130, as a shell reports Ctrl-C


_received: list[int] = []


def _interrupt_once(signum, frame):
    _received.append(signum)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def interrupt_received() -> bool:
    """Whether Ctrl-C came: the ``KeyboardInterrupt`` may have been turned into another
    error by the library it interrupted, so the command asks here, not the exception."""
    return bool(_received)


def main() -> int:
    """Run ``qcompile`` (``cli.main``) with Ctrl-C covered, imports included."""
    _received.clear()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt_once)
    try:
        from .cli import main as cli_main
        return cli_main()
    except BaseException:
        if not (_received or sys.exc_info()[0] is KeyboardInterrupt):
            raise
        print("qcompile: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
