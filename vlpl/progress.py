"""Progress on long work: a tqdm bar on an interactive terminal, log lines elsewhere (SLURM logs, CI, pipes).

Every stage reports through :func:`progress`, so that a job whose stderr is a file still says how far it
is, how fast it goes and when it will finish, one line every ``every_s`` seconds (and at the end), instead
of a bar redrawn into the log thousands of times or nothing at all::

    with progress(total=len(loader), desc="epoch 3/8", unit="step", enabled=is_main) as bar:
        for batch in loader:
            ...
            bar.update(1, loss=f"{loss:.4f}")
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

log = logging.getLogger("vlpl.progress")


def _fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class LogProgress:
    """Counts work and logs ``desc: n/total (p%) rate unit/s, elapsed, ETA, extra`` every ``every_s`` seconds."""

    def __init__(self, total: Optional[int], desc: str, unit: str, every_s: float, enabled: bool,
                 clock: Any = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.every_s, self.enabled = total, desc, unit, every_s, enabled
        self.clock = clock
        self.n = 0
        self.postfix: dict = {}
        self.t0 = self.t_last = clock()
        self.n_last = 0
        self.lines = 0

    def line(self) -> str:
        now = self.clock()
        dt = max(now - self.t0, 1e-9)
        rate = self.n / dt
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total} ({100.0 * self.n / self.total:.0f}%)" if self.total else "")]
        parts.append(f"{rate:.2f} {self.unit}/s")
        parts.append(f"elapsed {_fmt_duration(dt)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_fmt_duration((self.total - self.n) / rate)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        if self.enabled and self.clock() - self.t_last >= self.every_s:
            self._emit()

    def set_postfix(self, **postfix: Any) -> None:
        self.postfix.update(postfix)

    def _emit(self) -> None:
        log.info("%s", self.line())
        self.lines += 1
        self.t_last, self.n_last = self.clock(), self.n

    def close(self) -> None:
        if self.enabled and self.n != self.n_last:
            self._emit()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Bar:
    """tqdm with the same ``update(n, **postfix)`` interface."""

    def __init__(self, total: Optional[int], desc: str, unit: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            self.bar.set_postfix(**postfix, refresh=False)
        self.bar.update(n)

    def set_postfix(self, **postfix: Any) -> None:
        self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: Optional[int], desc: str, unit: str = "it", enabled: bool = True, every_s: float = 30.0,
             stream: Any = None) -> Any:
    """A bar when ``enabled`` and ``stream`` (default stderr) is a terminal; else log lines every ``every_s``
    seconds when ``enabled``; silent when not ``enabled`` (e.g. on ranks other than 0)."""
    stream = sys.stderr if stream is None else stream
    if enabled and getattr(stream, "isatty", lambda: False)():
        return _Bar(total, desc, unit)
    return LogProgress(total, desc, unit, every_s, enabled)
