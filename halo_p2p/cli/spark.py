"""Unicode sparklines for the terminal UI (last values of a per-token series)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["sparkline"]

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 24, *, floor: float | None = 0.0) -> str:
    """The last ``width`` values as bars scaled from ``floor`` (or their minimum) to their maximum."""
    tail = [v for v in values[-width:] if v == v]      # drop NaN
    if not tail:
        return ""
    lo = min(tail) if floor is None else min(floor, min(tail))
    span = max(tail) - lo
    if span <= 0:
        return _BARS[0] * len(tail)
    return "".join(_BARS[min(len(_BARS) - 1, int((v - lo) / span * (len(_BARS) - 1) + 0.5))] for v in tail)
