"""The wall clock as kvstore stamps event times, snapshot times and statistics with."""

from __future__ import annotations

import time

__all__ = ["now_us"]


def now_us() -> int:
    """The wall clock in microseconds since the Unix epoch."""
    return time.time_ns() // 1000
