"""How many threads the parallel kernels use.

Numba's thread count is thread-local: a Python thread started after `set_threads` (the TUI's
generation worker, say) would otherwise run with Numba's default. So the requested count is
kept here and every parallel kernel wrapper calls `apply_threads()` before it launches.

`auto` (the default) follows the cores other programs leave free. Numba's OpenMP workers spin
while they wait for each other, which is what makes a decode step of ~300 kernel launches fast
on an idle machine (a sleeping wait policy measured 4x slower there); but a worker that shares
its core with a busy process is descheduled for whole time slices while the others spin, and
decoding collapses (105 -> 0.5-3.4 tokens/s on two cores with one kept busy). So every
`_CHECK_SECONDS` the kernels' launcher measures how much CPU time other processes took on the
cores we may run on (from /proc/stat, less our own CPU time) and uses only the cores left free.
"""

import math
import os
import threading
import time

import numba

from localllm.errors import InvalidParameterError

THREADS_ENV_VAR = "LOCALLLM_THREADS"
AUTO = "auto"

# How often auto mode re-reads the machine's load, and how much of a core other programs must
# take, on average over that time, before auto mode gives that core up.
_CHECK_SECONDS = 0.5
_BUSY_CORE_SHARE = 0.5
# /proc/stat fields (after the name) counted as busy: user, nice, system, irq, softirq, steal.
# Niced processes count too: with autogroup scheduling (the desktop default) a niced job in
# another session still gets its session's full share (measured: the 1.5B model decoded at 2-6
# tokens/s on two threads beside a nice-19 job on both cores, 16 alone).
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)

_requested = numba.config.NUMBA_NUM_THREADS
_auto = False
# What this Python thread last gave Numba: asking Numba itself (get_num_threads) costs several
# microseconds, paid on every kernel call of a decode step.
_applied = threading.local()


def max_threads() -> int:
    """The most threads Numba's pool has (NUMBA_NUM_THREADS, all cores by default)."""
    return numba.config.NUMBA_NUM_THREADS


class _FreeCores:
    """Counts the cores of our CPU set that other processes leave free, from /proc/stat."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else set()
        self._ticks_per_second = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = None
        self.next_check = 0.0

    def _sample(self) -> tuple[float, float, float] | None:
        """(wall seconds, busy CPU seconds of our cores, our own CPU seconds), or None."""
        try:
            with open("/proc/stat", "rb") as stat:
                lines = stat.read().decode().splitlines()
        except OSError:
            return None
        busy = 0
        for line in lines:
            fields = line.split()
            if fields and fields[0] in self._cpus:
                values = fields[1:]
                busy += sum(int(values[i]) for i in _BUSY_FIELDS if i < len(values))
        return time.monotonic(), busy / self._ticks_per_second, time.process_time()

    def count(self, ceiling: int, current: int) -> int:
        """How many threads to use now: at most `ceiling`, `current` while unknown."""
        with self._lock:
            sample = self._sample()
            if sample is None:
                self.next_check = math.inf
                return ceiling
            last, self._last = self._last, sample
            self.next_check = sample[0] + _CHECK_SECONDS
            # A first sample, or one after a pause in the work (a chat waiting for its user),
            # says nothing about the load now: decide on the next one.
            if last is None or sample[0] - last[0] > 4 * _CHECK_SECONDS:
                return current
            wall = sample[0] - last[0]
            if wall <= 0:
                return current
            others = max(0.0, (sample[1] - last[1]) - (sample[2] - last[2])) / wall
            busy_cores = math.floor(others + 1 - _BUSY_CORE_SHARE)
            return max(1, min(ceiling, len(self._cpus) - busy_cores))


_free_cores = _FreeCores()


def set_threads(n) -> None:
    """Use `n` threads (1 to `max_threads()`) in every parallel kernel, from every Python thread;
    "auto" follows the cores other programs leave free."""
    global _requested, _auto
    if n == AUTO:
        _auto = True
        _requested = max_threads()
        _free_cores.next_check = 0.0
    else:
        if isinstance(n, bool) or not isinstance(n, int):
            raise InvalidParameterError(f"thread count must be an int or 'auto', got {n!r}")
        if not 1 <= n <= max_threads():
            raise InvalidParameterError(
                f"thread count must be between 1 and {max_threads()} (the size of Numba's pool, "
                f"NUMBA_NUM_THREADS), got {n}"
            )
        _auto = False
        _requested = n
    numba.set_num_threads(_requested)
    _applied.count = _requested


def get_threads() -> int:
    """The thread count kernels use now (in auto mode, the latest choice)."""
    return _requested


def is_auto() -> bool:
    return _auto


def apply_threads() -> None:
    """Make the calling Python thread use the requested count (cheap when it already does)."""
    global _requested
    if _auto and time.monotonic() >= _free_cores.next_check:
        _requested = _free_cores.count(max_threads(), _requested)
    if getattr(_applied, "count", None) != _requested:
        numba.set_num_threads(_requested)
        _applied.count = _requested


def threads_from_environment():
    """The thread count LOCALLLM_THREADS asks for: a number, or "auto" (also when unset)."""
    value = os.environ.get(THREADS_ENV_VAR, "").strip()
    if not value or value == AUTO:
        return AUTO
    try:
        n = int(value)
    except ValueError:
        raise InvalidParameterError(
            f"{THREADS_ENV_VAR} must be a whole number of threads or {AUTO}, got {value!r}"
        ) from None
    if not 1 <= n <= max_threads():
        raise InvalidParameterError(
            f"{THREADS_ENV_VAR}={n} is out of range: this machine's Numba pool has "
            f"{max_threads()} threads (raise NUMBA_NUM_THREADS to allow more)"
        )
    return n


set_threads(threads_from_environment())
