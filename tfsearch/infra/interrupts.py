"""Stopping a command on SIGINT (Ctrl-C) or SIGTERM within seconds, never as if it had finished.

While `INTERRUPTIONS.installed()` holds, either signal raises `Interrupted` in the main thread, wherever it
is. Inside `gracefully(stop)` the first signal instead calls `stop` and is remembered: the training stage
passes a stop that ends Ray Tune's run the way Tune ends it on its own signal (trial state saved for
`--resume`), the selection stage only notes it between its waits for the studies; each then calls `check`,
which raises. A second signal always raises at once.

Ray Tune handles SIGINT itself and leaves its handler installed after training, and `ray.init` installs a
SIGTERM handler that exits mid-call: Tune's is switched off (`TUNE_DISABLE_SIGINT_HANDLER`) and `install`
runs again after Ray starts, so these handlers stay in charge.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tfsearch.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


class Interruptions:
    """The process's SIGINT and SIGTERM handling for one command (`INTERRUPTIONS`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._stop: Callable[[], None] | None = None
        self._previous: dict[int, object] = {}
        self._tune_env: str | None = None

    def install(self) -> None:
        """Take over both signals (again, after a library replaced a handler); a no-op off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return
        if not self._previous:
            self._tune_env = os.environ.get(TUNE_SIGINT_ENV)
        os.environ[TUNE_SIGINT_ENV] = "1"
        for signum in SIGNALS:
            current = signal.getsignal(signum)
            if current != self._handle:
                self._previous.setdefault(signum, current)
                signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._previous:
            if self._tune_env is None:
                os.environ.pop(TUNE_SIGINT_ENV, None)
            else:
                os.environ[TUNE_SIGINT_ENV] = self._tune_env
        self._previous.clear()
        self.signum, self._stop = None, None

    @contextmanager
    def installed(self) -> Iterator[Interruptions]:
        self.signum = None
        self.install()
        try:
            yield self
        finally:
            self.restore()

    @contextmanager
    def gracefully(self, stop: Callable[[], None] = lambda: None) -> Iterator[None]:
        """The first signal inside calls `stop` instead of raising (by default it is only noted, in
        `signum`); `check` then raises. For code where an exception raised by a signal handler would land
        inside a library's own loop."""
        self._stop = stop
        try:
            yield
        finally:
            self._stop = None

    def check(self, stage: str) -> None:
        """Raise `Interrupted` when a signal came (inside `gracefully`, where it did not raise)."""
        if self.signum is not None:
            raise Interrupted(self.signum, stage)

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if first and self._stop is not None:
            self._stop()
            return
        raise Interrupted(self.signum)


INTERRUPTIONS = Interruptions()


@contextmanager
def during(stage: str) -> Iterator[None]:
    """Name the stage an interruption stopped (the innermost name wins)."""
    try:
        yield
    except Interrupted as exc:
        raise Interrupted(exc.signum, exc.stage or stage) from None
