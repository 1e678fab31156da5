"""SIGINT and SIGTERM during a long run: stop at the next safe point, not wherever the signal lands.

While :class:`StopSignals` is active the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's
stop) only records itself; the loop polls :attr:`StopSignals.requested` at its safe points
(between rounds), saves what it has and raises :class:`Interrupted`. A second signal means
"now": :class:`HardStop` is raised where the program is (the atomic writes leave no half
file behind). Before :meth:`StopSignals.defer` is called (while a run is being set up and
there is nothing to save) the first signal already stops at once.

The exit status is 128 + the signal's number, as a shell reports a process killed by it:
130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
import threading

from .errors import StarsDeployError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupted(StarsDeployError):
    """A run stopped by a signal; the message says what was saved and how to continue."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = exit_code(signum)


class HardStop(BaseException):
    """Raised by the signal handler itself: not an Exception, so that no ``except Exception``
    on the way (a compiler fallback, say) swallows the user's stop."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


class StopSignals:
    """Context manager: SIGINT and SIGTERM handled as described above, the previous handlers
    restored on exit. Outside the main thread (where Python cannot take signals) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._deferred = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def defer(self) -> None:
        """From now on the first signal waits for the next safe point."""
        self._deferred = True

    def _handle(self, signum, frame) -> None:
        if self._deferred and self.signum is None:
            self.signum = signum
            return
        self.signum = self.signum or signum
        raise HardStop(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
