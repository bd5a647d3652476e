"""Progress of a long loop, the same way everywhere: a live bar in a terminal, plain lines in a log.

A live bar written to a file (a batch log, ``nohup``, CI) is either silent or a wall of carriage returns, so
when stdout is not a terminal :class:`TaskProgress` prints one line every tenth of the work or every minute,
whichever comes first (``evaluation: 400/1000 images (40%) | 38 images/s | ETA 16s``) and a closing
``done`` line, as :class:`ditlab.callbacks.monitor.LineProgress` does for training steps. In a terminal it is
a transient rich bar; while ``ditlab fit``'s step bar is live (:func:`hosted_by`), the task joins that bar
instead of opening a second live display, which rich refuses.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

_HOST: list[Progress] = []  # the live bar of a running fit that tasks join (innermost last)


def duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``185`` -> ``"3m05s"``, ``42`` -> ``"42s"``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@contextmanager
def hosted_by(progress: Progress | None) -> Iterator[None]:
    """Inside this block, terminal tasks are added to ``progress`` (a live rich bar) rather than opening their
    own live display; None changes nothing."""
    if progress is None:
        yield
        return
    _HOST.append(progress)
    try:
        yield
    finally:
        _HOST.remove(progress)


class TaskProgress:
    """Counts ``total`` units of work under ``description``; use as a context manager and call :meth:`advance`.

    Args:
        description: what is being done, the start of every line (``sampling``, ``reference statistics``).
        total: units of work in all.
        unit: what a unit is, for the lines (``images``, ``criteria``).
        enabled: False prints nothing (other ranks, ``--no-progress``).
        terminal: a live bar (True) or plain lines (False); None asks whether ``stream`` is a terminal.
        lines: plain lines per task (one at every ``1/lines`` of the work), besides the ``done`` line.
        every_n_seconds: a plain line at least this often, whatever the progress.
        min_seconds: no plain line sooner than this after the previous one (a fast task prints only ``done``).
        stream: where plain lines go (default stdout).
    """

    def __init__(self, description: str, total: int, unit: str = "images", enabled: bool = True,
                 terminal: bool | None = None, lines: int = 10, every_n_seconds: float = 60.0,
                 min_seconds: float = 2.0, stream: TextIO | None = None) -> None:  # fmt: skip
        self.description, self.total, self.unit, self.enabled = description, max(0, int(total)), unit, enabled
        self.stream = stream
        self.terminal = terminal if terminal is not None else self._stream().isatty()
        self.lines, self.every_n_seconds, self.min_seconds = max(1, lines), every_n_seconds, min_seconds
        self.count = 0
        self._start = self._last = 0.0
        self._next_mark = 1
        self._bar: Progress | None = None
        self._owned = False
        self._task = None

    def _stream(self) -> TextIO:
        return self.stream or sys.stdout

    def __enter__(self) -> TaskProgress:
        self._start = self._last = time.perf_counter()
        if self.enabled and self.terminal:
            if _HOST:
                self._bar = _HOST[-1]
            else:
                columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn(self.unit), TimeRemainingColumn())  # fmt: skip
                self._bar, self._owned = Progress(*columns, transient=True), True
                self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, amount: int = 1) -> None:
        """``amount`` more units done."""
        self.count += amount
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.advance(self._task, amount)
            return
        if self.terminal or self.count >= self.total:
            return
        now = time.perf_counter()
        marked = self.total > 0 and self.count * self.lines >= self._next_mark * self.total
        if (marked and now - self._last >= self.min_seconds) or now - self._last >= self.every_n_seconds:
            self.say(self.line(now))
            self._last = now
        if marked:
            self._next_mark = self.count * self.lines // max(1, self.total) + 1

    def line(self, now: float) -> str:
        """``sampling: 400/1000 images (40%) | 38 images/s | ETA 16s``."""
        share = f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
        text = f"{self.description}: {self.count}/{self.total} {self.unit}{share}"
        elapsed = now - self._start
        if elapsed > 0 and self.count > 0:
            remaining = elapsed / self.count * (self.total - self.count)
            text += f" | {self.count / elapsed:.3g} {self.unit}/s | ETA {duration(remaining)}"
        return text

    def say(self, text: str) -> None:
        print(text, file=self._stream(), flush=True)

    def __exit__(self, kind, error, traceback) -> None:
        if self._bar is not None:
            self._bar.remove_task(self._task)
            if self._owned:
                self._bar.stop()
            self._bar = None
        elif self.enabled and not self.terminal and error is None:
            took = duration(time.perf_counter() - self._start)
            self.say(f"{self.description}: done, {self.count} {self.unit} in {took}")
