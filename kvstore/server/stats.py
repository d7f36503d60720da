"""Activity and freshness of each table since the node started: rows written, keys
read and deleted, and the lag from an update's event time to when it became readable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["LAG_SAMPLES", "TableStats"]

#: Updates whose lag the percentiles cover (the most recent ones).
LAG_SAMPLES = 4096


@dataclass
class TableStats:
    """Activity and freshness of one table since the node started. Times in µs."""

    rows_updated: int = 0
    keys_deleted: int = 0
    keys_read: int = 0
    newest_event_time_us: int = 0
    lags_us: np.ndarray = field(default_factory=lambda: np.zeros(LAG_SAMPLES, np.int64))
    lag_count: int = 0

    def record_updates(self, event_times: np.ndarray, applied_us: int) -> None:
        """Record that updates with these event times became readable at ``applied_us``."""
        self.rows_updated += len(event_times)
        newest = int(event_times.max())
        self.newest_event_time_us = max(self.newest_event_time_us, newest)
        lags = applied_us - event_times[-LAG_SAMPLES:]
        start = self.lag_count % LAG_SAMPLES
        end = start + len(lags)
        if end <= LAG_SAMPLES:
            self.lags_us[start:end] = lags
        else:
            split = LAG_SAMPLES - start
            self.lags_us[start:] = lags[:split]
            self.lags_us[: end - LAG_SAMPLES] = lags[split:]
        self.lag_count += len(lags)

    def lag_percentiles(self) -> tuple[float, float, int]:
        """(p50, p99, samples) of the update lag over the last updates, µs."""
        n = min(self.lag_count, LAG_SAMPLES)
        if not n:
            return 0.0, 0.0, 0
        p50, p99 = np.percentile(self.lags_us[:n], [50, 99])
        return float(p50), float(p99), n


class StatsByTable(dict[str, TableStats]):
    """Each table's ``TableStats``, created on first use."""

    def __missing__(self, name: str) -> TableStats:
        stats = self[name] = TableStats()
        return stats
