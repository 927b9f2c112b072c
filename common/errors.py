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
from typing import NoReturn

__all__ = ["fail", "install", "user_error", "warn"]


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


def fail(err: BaseException | str, note: str = "") -> NoReturn:
    """End a command on a user mistake caught by name: ``error: <where>: <problem>[; note]`` on one line of
    stderr, exit status 1 -- the line the hook prints for an uncaught one."""
    sys.stderr.write(f"error: {err}{'; ' + note if note else ''}\n")
    sys.stderr.flush()
    raise SystemExit(1)


def warn(where, problem: str, record: list | None = None) -> str:
    """Input that can still be processed but may not be what the user meant: ``warning: <where>: <problem>`` on
    stderr, and appended to ``record`` (what the command writes into its output JSON)."""
    message = f"{where}: {problem}"
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()
    if record is not None:
        record.append(message)
    return message


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
