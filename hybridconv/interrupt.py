"""Deterministic interruption (Ctrl-C, SIGTERM).

A signal handler that raises lands wherever the main thread happens to be: in
the middle of ``np.save``, a ``with`` statement's exit or a library's clean-up,
which then fails with an unrelated error (an "internal error", exit 70, instead
of 143). So the CLI's handlers only *record* the signal (:func:`request`) and
the long loops call :func:`check` at safe points — between tensors written,
sequences compared, release steps — where raising leaves nothing half-done and
every ``finally`` / ``except BaseException`` clean-up runs in full. A second
signal (the user insists: a long native call may not reach a safe point soon)
raises at once, except inside :func:`critical` sections (renaming an output
into place), which always finish.

Library users who install no handler are unaffected: :func:`check` does nothing
and Python's default ``KeyboardInterrupt`` behaviour stays.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager


class Terminated(BaseException):
    """Raised at a safe point after SIGTERM, so that clean-up (``finally``) runs."""


_pending: list[int] = []  # signals received and not yet acted on, in order
_acted: list[int] = []  # signals raised at a safe point (the work was stopped there)
_critical = 0


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def request(signum: int) -> None:
    """Record ``signum`` (the CLI's handler); raise at once if one was already
    pending and no critical section runs."""
    _pending.append(signum)
    if len(_pending) > 1 and not _critical:
        _acted.append(_pending[0])
        raise _exception(_pending[0])


def pending() -> int | None:
    return _pending[0] if _pending else None


def check() -> None:
    """A safe point: raise ``KeyboardInterrupt`` / :class:`Terminated` if a signal
    was recorded."""
    if _pending and not _critical:
        _acted.append(_pending[0])
        raise _exception(_pending[0])


def acted() -> bool:
    """Whether a recorded signal was raised at a safe point (the work stopped there);
    False when it came after the last one (the work finished)."""
    return bool(_acted)


def reset() -> None:
    _pending.clear()
    _acted.clear()


@contextmanager
def critical():
    """A block no signal interrupts (it runs to its end; the signal is acted on
    at the next safe point)."""
    global _critical
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
