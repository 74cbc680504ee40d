"""Progress output that suits both a terminal and a log file.

`progress(...)` returns what a long loop reports to (`update`, `set_postfix`, used as a context
manager):

- on a terminal with progress bars wanted (`bars=True` and stderr a TTY): a tqdm bar;
- otherwise (`--no-progress`, or stderr redirected to a log file, where `\\r` bars would fill the
  file): `ProgressLines`, a plain line every `LINE_INTERVAL` seconds (`label: 120/500 rows (24%),
  1:02 elapsed, about 3:15 left`) and nothing for a loop that finishes sooner;
- `show=False` (e.g. every torchrun rank but rank 0): nothing.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any, TextIO

__all__ = ["LINE_INTERVAL", "ProgressLines", "progress"]

#: seconds between two plain progress lines
LINE_INTERVAL = 30.0


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class ProgressLines:
    """A tqdm-like counter that prints a plain line at most every `interval` seconds (none at the start)."""

    def __init__(self, total: int, *, initial: int = 0, label: str = "", unit: str = "rows",
                 interval: float | None = None, stream: TextIO | None = None) -> None:
        self.total = total
        self.count = initial
        self.initial = initial
        self.label = label
        self.unit = unit
        self.interval = LINE_INTERVAL if interval is None else interval
        self.stream = stream
        self.started = self.last = time.monotonic()
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        """Count `n` more finished items; print a line if `interval` seconds passed since the last one."""
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=self.stream or sys.stderr, flush=True)

    def set_postfix(self, values: dict[str, Any] | None = None, **more: Any) -> None:
        """Extra values shown at the end of the next line (e.g. the running loss)."""
        self.postfix = {**(values or {}), **more}

    def line(self, now: float | None = None) -> str:
        """`label: count/total unit (percent), elapsed, about ... left[, postfix]`."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        done = self.count - self.initial
        text = f"{self.label + ': ' if self.label else ''}{self.count}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100 * self.count / self.total:.0f}%)"
        text += f", {_clock(elapsed)} elapsed"
        if done > 0 and self.total > self.count:
            text += f", about {_clock(elapsed / done * (self.total - self.count))} left"
        if self.postfix:
            text += ", " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return text

    def close(self) -> None:
        pass

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Silent(ProgressLines):
    def update(self, n: int = 1) -> None:
        self.count += n


def progress(total: int, *, label: str = "", initial: int = 0, unit: str = "rows", bars: bool = True,
             show: bool = True, leave: bool = True) -> Any:
    """The progress reporter of a loop over `total` items (`initial` already done): see the module docstring."""
    if not show:
        return _Silent(total, initial=initial, label=label, unit=unit)
    if bars and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=label, leave=leave, dynamic_ncols=True)
    return ProgressLines(total, initial=initial, label=label, unit=unit)
