"""Wall time of a run's phases: `timing.json` in the workdir and one line at the end of a run.

Phases nest (`data build` and `feature extraction` happen within `set-up` or `evaluation`); a
phase's total is the time spent in it and not in a phase nested in it, so the totals add up to
the time the phases cover. `xmodal train` resets them when it starts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

_TOTALS: dict[str, float] = {}
_STACK: list[list] = []  # open phases: [name, when its current stretch began]


def _add(name: str, seconds: float) -> None:
    _TOTALS[name] = _TOTALS.get(name, 0.0) + seconds


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Counts the time of the `with` block, less its nested phases, towards phase `name`."""
    now = time.perf_counter()
    if _STACK:  # the enclosing phase pauses
        _add(_STACK[-1][0], now - _STACK[-1][1])
    frame = [name, now]
    _STACK.append(frame)
    try:
        yield
    finally:
        now = time.perf_counter()
        _STACK.pop()
        _add(name, now - frame[1])
        if _STACK:  # ... and resumes
            _STACK[-1][1] = now


def reset() -> None:
    _TOTALS.clear()


def totals() -> dict[str, float]:
    """Seconds per phase, in the order the phases first ended."""
    return dict(_TOTALS)


def line(totals_s: dict[str, float]) -> str:
    return "Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in totals_s.items())
