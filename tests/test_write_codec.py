"""The codec's helpers of the node's write path (the end of ext/encode.pxi): a step's
rows gathered into one block, the rows' event times and the request's repeated keys,
each checked against a plain NumPy/Python version of itself."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore import _codec


def _block(rng: np.random.Generator, n: int) -> tuple[bytes, np.ndarray]:
    lengths = rng.integers(13, 60, n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return rng.integers(0, 256, int(offsets[-1]), dtype=np.uint8).tobytes(), offsets


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_gather_rows_picks_rows_in_any_order_into_one_block(dtype: type) -> None:
    rng = np.random.default_rng(1)
    buf, offsets = _block(rng, 500)
    for positions in (rng.permutation(500)[:37], np.array([7, 7, 0, 499]), np.array([], int)):
        got, got_offsets = _codec.gather_rows(buf, offsets, positions.astype(dtype))
        rows = [buf[offsets[p] : offsets[p + 1]] for p in positions.tolist()]
        assert got == b"".join(rows)
        assert got_offsets.dtype == np.int64
        assert got_offsets.tolist() == [0, *np.cumsum([len(r) for r in rows]).tolist()]


def test_gather_rows_refuses_positions_and_rows_out_of_range() -> None:
    buf, offsets = b"abcdef", np.array([0, 2, 6], np.int64)
    with pytest.raises(ValueError, match=r"positions\[1\] is 2"):
        _codec.gather_rows(buf, offsets, np.array([0, 2], np.int32))
    with pytest.raises(ValueError, match=r"positions\[0\] is -1"):
        _codec.gather_rows(buf, offsets, np.array([-1]))
    with pytest.raises(ValueError, match="not a range of the buffer"):
        _codec.gather_rows(buf, np.array([0, 2, 9], np.int64), np.array([1]))


def test_row_event_times_reads_each_rows_header_time() -> None:
    rng = np.random.default_rng(2)
    buf, offsets = _block(rng, 300)
    expected = [int(np.frombuffer(buf[a + 5 : a + 13], "<i8")[0]) for a in offsets[:-1].tolist()]
    assert _codec.row_event_times(buf, offsets).tolist() == expected
    with pytest.raises(ValueError, match="row 1"):
        _codec.row_event_times(b"x" * 20, np.array([0, 13, 20], np.int64))


def _repeats(keys: list[int]) -> list[int]:
    seen: dict[int, int] = {}
    out = []
    for k in keys:
        out.append(seen.get(k, 0))
        seen[k] = out[-1] + 1
    return out


def test_key_repeats_counts_earlier_occurrences_and_is_none_without_repeats() -> None:
    rng = np.random.default_rng(3)
    assert _codec.key_repeats(np.array([], np.int64)) is None
    assert _codec.key_repeats(rng.permutation(5000).astype(np.int64)) is None
    extremes = np.array([-(2**63), 2**63 - 1, 0, -1], np.int64)
    assert _codec.key_repeats(extremes) is None
    for keys in (
        rng.integers(0, 50, 2000),
        np.concatenate([extremes, extremes[::-1], [0]]),
        np.full(100, 42),
    ):
        keys = keys.astype(np.int64)
        got = _codec.key_repeats(keys)
        assert got is not None and got.dtype == np.int32
        assert got.tolist() == _repeats(keys.tolist())
