"""Measure the machine's memory read bandwidth, the ceiling for matvec over quantized weights."""

import time

import numpy as np
from numba import njit, prange

_LANES = 64


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _streaming_sum(data):
    # Independent partial sums per chunk keep the loop vectorized and the cores busy on loads.
    chunks = data.shape[0] // _LANES
    partial = np.zeros(_LANES, dtype=np.float64)
    for lane in prange(_LANES):
        # A slice indexed from zero: a computed index would add Numba's negative-index fix-up
        # to every load and make the sum compute-bound instead of memory-bound.
        chunk = data[lane * chunks : (lane + 1) * chunks]
        acc = np.float32(0.0)
        for j in range(chunk.shape[0]):
            acc += chunk[j]
        partial[lane] = acc
    return partial.sum()


def read_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth in GB/s (1e9 bytes) for a parallel sum over `size_bytes`."""
    data = np.ones(size_bytes // 4, dtype=np.float32)
    _streaming_sum(data[: _LANES * 16])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _streaming_sum(data)
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9
