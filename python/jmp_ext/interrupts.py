"""SIGTERM as Ctrl-C for the command lines (python -m jmp_ext.train, python -m jmp_ext.data)."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigterm_interrupts():
    """While the block runs, SIGTERM (a scheduler's time limit, `timeout`, `docker stop`,
    torchrun stopping its ranks) raises KeyboardInterrupt as Ctrl-C does: the command ends with
    its message and its clean-up (temporary datasets removed; training's first one saves
    last.pt: Trainer) rather than dying where it stands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        # The next one kills at once: a handler runs only between bytecodes, not while a rank
        # waits in a collective.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
