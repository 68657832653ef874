"""warn_user: a warning attributed to the user's line, not to a library's."""

from __future__ import annotations

import contextlib
import sys
import warnings

# The packages whose frames a warning passes over to reach the user's code: ours, ASE (a
# calculator is called from atoms.get_forces through ASE's property machinery) and torch
# (no_grad's decorator wraps our functions).
_LIBRARIES = ("jmp_ext", "ase", "torch")


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn(message, category), attributed to the innermost caller outside jmp_ext, ASE
    and torch, as Python 3.12's skip_file_prefixes does: a location inside a library says
    nothing to the user, and the default filter then shows a warning once per line of theirs.
    In a process group (torch.distributed, as the trainer sets up under torchrun) only rank 0
    warns: the ranks check the same config and data, and said once per rank the warning
    repeats itself."""
    distributed = getattr(sys.modules.get("torch"), "distributed", None)  # (never imports torch itself)
    if distributed is not None and distributed.is_available() and distributed.is_initialized() \
            and distributed.get_rank() != 0:
        return
    frame, stacklevel = sys._getframe(1), 2  # (stacklevel 2: this function's caller)
    while frame is not None and (frame.f_globals.get("__name__") or "").partition(".")[0] in _LIBRARIES:
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, category, stacklevel=stacklevel)


@contextlib.contextmanager
def plain_warnings():
    """For the command lines, while the block runs: a warning printed as "warning: MESSAGE",
    without the file, line and source line Python adds (there, the CLI's own code), on a line
    of its own: a progress bar is cleared first (it is drawn again at its next update), where the
    warning would otherwise continue the bar's line."""
    from tqdm import tqdm

    def plain(message, category, filename, lineno, line=None):
        for bar in list(tqdm._instances):  # (the open bars, as tqdm.write clears them)
            bar.clear()
        return f"warning: {message}\n"

    previous = warnings.formatwarning
    warnings.formatwarning = plain
    try:
        yield
    finally:
        warnings.formatwarning = previous
