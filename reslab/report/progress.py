"""Progress for long commands: a tqdm bar per phase on a terminal, a line per phase otherwise.

The analysis functions take an optional ``progress(done, total)`` callback and decide nothing
about printing; the command layer makes a :class:`PhaseProgress` and hands each phase's
callback down (``reporter.phase("lesion single: resnet20")``).
"""
from __future__ import annotations

import sys
import time
from typing import IO, Callable

Tick = Callable[[int, int], None]


class PhaseProgress:
    """Reports named phases of a long command on ``file`` (stderr by default).

    ``enabled=False``: silent. Otherwise a tqdm bar per phase when ``file`` is a terminal
    (``bars=None`` decides by ``isatty``), and plain lines when it is not: one when a phase
    starts, one when it ends (with its wall time), and one every ``interval`` seconds in between.
    """

    def __init__(self, enabled: bool = True, file: IO[str] | None = None, bars: bool | None = None,
                 interval: float = 30.0) -> None:
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled
        isatty = getattr(self.file, "isatty", lambda: False)()
        self.bars = bool(enabled and (isatty if bars is None else bars))
        self.interval = interval
        self._name: str | None = None
        self._bar = None
        self._t0 = self._last = 0.0
        self._done = self._total = 0
        self.times: dict[str, float] = {}  # phase name -> wall seconds, for a report

    # -- one phase ---------------------------------------------------------------------------
    def phase(self, name: str) -> Tick:
        """The callback of phase ``name``: call it as ``tick(done, total)``."""

        def tick(done: int, total: int) -> None:
            self.update(name, done, total)

        return tick

    def update(self, name: str, done: int, total: int) -> None:
        if name != self._name:
            self.end()
            self._start(name, total)
        self._done, self._total = done, total
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.total = total
            self._bar.n = done
            self._bar.refresh()
        elif time.perf_counter() - self._last >= self.interval and 0 < done < total:
            self._line(f"{name}: {done}/{total} ({time.perf_counter() - self._t0:.0f} s)")
        if done >= total > 0:
            self.end()

    def line(self, text: str) -> None:
        """A one-off message (below the bars on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.file)
        else:
            self._line(text)

    def end(self) -> None:
        """Close the current phase (also done by the next phase, or on completion)."""
        if self._name is None:
            return
        dt = time.perf_counter() - self._t0
        self.times[self._name] = self.times.get(self._name, 0.0) + dt
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            self._line(f"{self._name}: done {self._done}/{self._total} in {dt:.1f} s")
        self._name = None

    close = end

    def __enter__(self) -> "PhaseProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()

    # -- internals ---------------------------------------------------------------------------
    def _start(self, name: str, total: int) -> None:
        self._name, self._t0 = name, time.perf_counter()
        if not self.enabled:
            return
        if self.bars:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=name, file=self.file, dynamic_ncols=True, leave=True)
        else:
            self._line(f"{name}: started ({total} steps)")

    def _line(self, text: str) -> None:
        self._last = time.perf_counter()
        print(text, file=self.file, flush=True)
