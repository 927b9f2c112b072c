"""How a user mistake reaches the user: the message alone, at the end, and a non-zero exit code.

A :class:`common.io.DataError` names the file (or flag) and the problem. Raised anywhere under any entry point
-- ``python -m tools``, ``python -m monai.bundle run`` (whose expression evaluator re-wraps it in a
``RuntimeError("Failed to evaluate ...")`` with a page of traceback), torchrun workers -- and left uncaught, it is
printed as ``error: <file>: <problem>`` with nothing else, through :func:`install`'s ``sys.excepthook``
(installed when ``common`` is imported). Any other exception keeps its full traceback: that is a bug, not a user
mistake. ``BRATS_SYNTH_TRACEBACK=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys

__all__ = ["install", "user_error"]


def user_error(exc: BaseException | None) -> BaseException | None:
    """The :class:`common.io.DataError` in ``exc``'s cause/context chain, or None."""
    from common.io import DataError

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _hook(previous):
    def hook(kind, value, traceback):
        err = user_error(value)
        if err is None or os.environ.get("BRATS_SYNTH_TRACEBACK"):
            return previous(kind, value, traceback)
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()

    hook.brats_synth = True
    return hook


def install() -> None:
    """Put the user-error printer in front of the current ``sys.excepthook`` (once)."""
    if not getattr(sys.excepthook, "brats_synth", False):
        sys.excepthook = _hook(sys.excepthook)
