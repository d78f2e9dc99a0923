"""How many threads the parallel kernels use.

Numba's thread count is thread-local: a Python thread started after `set_threads` (the TUI's
generation worker, say) would otherwise run with Numba's default. So the requested count is
kept here and every parallel kernel wrapper calls `apply_threads()` before it launches.
"""

import os
import threading

import numba

from localllm.errors import InvalidParameterError

THREADS_ENV_VAR = "LOCALLLM_THREADS"

_requested = numba.config.NUMBA_NUM_THREADS
# What this Python thread last gave Numba: asking Numba itself (get_num_threads) costs several
# microseconds, paid on every kernel call of a decode step.
_applied = threading.local()


def max_threads() -> int:
    """The most threads Numba's pool has (NUMBA_NUM_THREADS, all cores by default)."""
    return numba.config.NUMBA_NUM_THREADS


def set_threads(n: int) -> None:
    """Use `n` threads (1 to `max_threads()`) in every parallel kernel, from every Python thread."""
    global _requested
    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidParameterError(f"thread count must be an int, got {n!r}")
    if not 1 <= n <= max_threads():
        raise InvalidParameterError(
            f"thread count must be between 1 and {max_threads()} (the size of Numba's pool, "
            f"NUMBA_NUM_THREADS), got {n}"
        )
    _requested = n
    numba.set_num_threads(n)
    _applied.count = n


def get_threads() -> int:
    return _requested


def apply_threads() -> None:
    """Make the calling Python thread use the requested count (cheap when it already does)."""
    if getattr(_applied, "count", None) != _requested:
        numba.set_num_threads(_requested)
        _applied.count = _requested


def threads_from_environment() -> int:
    """The thread count LOCALLLM_THREADS asks for, or every thread of Numba's pool if unset."""
    value = os.environ.get(THREADS_ENV_VAR, "").strip()
    if not value:
        return max_threads()
    try:
        n = int(value)
    except ValueError:
        raise InvalidParameterError(
            f"{THREADS_ENV_VAR} must be a whole number of threads, got {value!r}"
        ) from None
    if not 1 <= n <= max_threads():
        raise InvalidParameterError(
            f"{THREADS_ENV_VAR}={n} is out of range: this machine's Numba pool has "
            f"{max_threads()} threads (raise NUMBA_NUM_THREADS to allow more)"
        )
    return n


set_threads(threads_from_environment())
