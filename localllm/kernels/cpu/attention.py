"""Grouped-query attention over a KV cache whose slots carry explicit positions.

Key j is visible to query i iff k_pos[j] <= q_pos[i] and (window == 0 or q_pos[i] - k_pos[j] <
window): llama.cpp's causal mask and its sliding-window (SWA) mask. The cache may evict and
renumber slots, so k_pos is never assumed sorted or contiguous. A query that sees no key gets zeros.

Attention sinks (StreamingLLM): the first `n_sink` slots are scored against `q_sink` instead of q
and are exempt from the window. The caller rotates q_sink for the query's position inside a
streaming cache, while q is rotated for its position in the text, as the window's keys are.

K and V are float32 or f16; f16 arrives as its uint16 bits and is widened as it is read, so a
decode step never copies the cache.

Batch invariance: every (query, head) row gets the same bits whether it is computed alone or in a
batch of any size, over a cache holding more or fewer keys it cannot see, in whichever slots
(issue 17; prefill and token-by-token decoding must agree exactly). The kernels run with
fastmath, whose rounding depends on the code path and on how a sum is split up, so nothing a row
goes through may depend on the other rows or on the keys it cannot see:

- Keys are laid out by position, not by slot: non-sink keys at positions [c * KEY_CHUNK,
  (c + 1) * KEY_CHUNK) form chunk c, in which the key at position p is entry p % KEY_CHUNK; the
  sink slots form chunks of their own, entry = slot. Chunks are the steps of an online (running
  max / running sum) softmax, and each sums a row's weights over all its entries, held or not
  (a missing or masked key weighs exactly 0).
- Dots and value sums take the entries four at a time (4m .. 4m + 3), always through the same
  code: a group with missing keys borrows a held key of the group and masks it. Groups and
  chunks that no query of a block can see are skipped, which for each row of the block is the
  same as weighing them 0.
- The dots take a query's heads of one kv head two at a time (an odd group: the last three
  together; a group of one: alone), never heads of different queries, so the code path of a
  row never depends on the batch.
- Chunks form runs of _CHUNKS_PER_RUN chunks by position (the sinks: a run of their own), each
  with a softmax of its own; runs merge in position order by one strict-IEEE fold, whether one
  task folds them as it goes (prefill: enough tasks already) or tasks of their own compute them
  in parallel (decode). A run a row cannot see drops out of its fold.

Tasks are (block of queries, kv head) or (block, kv head, run): each reads its K/V rows once for
every query head of the group and every query of the block, so memory stays O(queries x chunk).
"""

import math

import numba
import numpy as np

from localllm.errors import KernelError
from localllm.kernels.arguments import check_attention_arguments
from localllm.kernels.cpu.checks import FAST_REDUCTION, check_f32, check_out, check_positions
from localllm.kernels.cpu.floats import stored_to_float
from localllm.kernels.cpu.threads import apply_threads, get_threads

# Keys per chunk of the online softmax; with (query, head) rows per task it bounds the score
# buffer, and rows x head_dim floats of accumulator should stay in L1/L2.
KEY_CHUNK = 128
_ROWS_PER_BLOCK = 32
# Runs of 512 positions: enough of them for a decode step to keep the threads busy, few enough
# that folding them costs nothing next to their keys.
_CHUNKS_PER_RUN = 4
# Runs get tasks of their own only while the (block, kv head) tasks are fewer than this many per
# thread, and while their partial results stay under _MAX_PARTIAL_FLOATS.
_TASKS_PER_THREAD = 4
_MAX_PARTIAL_FLOATS = 1 << 22


@numba.njit(cache=True, nogil=True, inline="always")
def _visible(key_position, query_position, window):
    if key_position > query_position:
        return False
    return window == 0 or query_position - key_position < window


@numba.njit(cache=True, nogil=True)
def _key_layout(k_pos, n_sink):
    """(order, chunks, runs): the slots in layout order are x < n_sink (the sinks) and then
    order[x - n_sink], or x itself where order is empty (the slots are in position order already,
    as the runtime's cache keeps them: no sort, no table); chunk c is x in chunks[c] ..
    chunks[c + 1], run r is chunks runs[r] .. runs[r + 1]. Sink chunks come first."""
    n_keys = k_pos.shape[0]
    ordered = True
    for j in range(n_sink + 1, n_keys):
        ordered &= k_pos[j] > k_pos[j - 1]
    order = np.empty(0, dtype=np.int64) if ordered else np.argsort(k_pos[n_sink:], kind="mergesort") + n_sink
    n_sink_chunks = (n_sink + KEY_CHUNK - 1) // KEY_CHUNK
    chunks = np.empty(n_sink_chunks + n_keys - n_sink + 1, dtype=np.int64)
    for c in range(n_sink_chunks):
        chunks[c] = c * KEY_CHUNK
    n_chunks = n_sink_chunks
    x = n_sink
    while x < n_keys:
        chunks[n_chunks] = x
        n_chunks += 1
        if ordered:
            # Distinct positions: the chunk ends within KEY_CHUNK slots.
            end = (k_pos[x] // KEY_CHUNK + 1) * KEY_CHUNK
            low, high = x + 1, min(x + KEY_CHUNK, n_keys)
            while low < high:
                middle = (low + high) // 2
                if k_pos[middle] < end:
                    low = middle + 1
                else:
                    high = middle
            x = low
        else:
            # Equal positions (adjacent once sorted) cannot share an entry: the second one
            # opens a new chunk.
            chunk_id = k_pos[order[x - n_sink]] // KEY_CHUNK
            last_position = k_pos[order[x - n_sink]]
            x += 1
            while x < n_keys:
                position = k_pos[order[x - n_sink]]
                if position // KEY_CHUNK != chunk_id or position == last_position:
                    break
                last_position = position
                x += 1
    chunks[n_chunks] = n_keys
    runs = np.empty(n_chunks + 1, dtype=np.int64)
    n_runs = 0
    if n_sink:
        runs[0] = 0
        n_runs = 1
    last_run = 0
    for c in range(n_sink_chunks, n_chunks):
        x = chunks[c]
        run = k_pos[x if ordered else order[x - n_sink]] // (KEY_CHUNK * _CHUNKS_PER_RUN)
        if c == n_sink_chunks or run != last_run:
            runs[n_runs] = c
            n_runs += 1
        last_run = run
    runs[n_runs] = n_chunks
    return order, chunks[: n_chunks + 1], runs[: n_runs + 1]


@numba.njit(cache=True, nogil=True, fastmath=FAST_REDUCTION)
def _chunk_dots(q, k, g, first_query, keys, active, width, dots):
    """dots[row, t] = q[row] . k[keys[t], g] over the active groups of four entries (the others
    are left as they were).

    Row r is query first_query + r // group, head g * group + r % group. Each query's heads go
    two, or the last three of an odd group three, at a time by four keys, so that each loaded q
    and k value feeds several multiply-adds; a group of one goes alone.
    """
    group = q.shape[1] // k.shape[1]
    rows = dots.shape[0]
    head_dim = q.shape[2]
    for t in range(0, width, 4):
        if not active[t // 4]:
            continue
        j0, j1, j2, j3 = keys[t], keys[t + 1], keys[t + 2], keys[t + 3]
        for r0 in range(0, rows, group):
            i = first_query + r0 // group
            h = 0
            while h + 2 <= group and h + 3 != group:
                h0, r = g * group + h, r0 + h
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
                for d in range(head_dim):
                    x, y = q[i, h0, d], q[i, h0 + 1, d]
                    k0, k1 = stored_to_float(k[j0, g, d]), stored_to_float(k[j1, g, d])
                    k2, k3 = stored_to_float(k[j2, g, d]), stored_to_float(k[j3, g, d])
                    a0 += x * k0
                    a1 += x * k1
                    a2 += x * k2
                    a3 += x * k3
                    b0 += y * k0
                    b1 += y * k1
                    b2 += y * k2
                    b3 += y * k3
                dots[r, t], dots[r, t + 1], dots[r, t + 2], dots[r, t + 3] = a0, a1, a2, a3
                dots[r + 1, t], dots[r + 1, t + 1], dots[r + 1, t + 2], dots[r + 1, t + 3] = b0, b1, b2, b3
                h += 2
            if h + 3 == group:
                h0, r = g * group + h, r0 + h
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = c0 = c1 = c2 = c3 = np.float32(0.0)
                for d in range(head_dim):
                    x, y, z = q[i, h0, d], q[i, h0 + 1, d], q[i, h0 + 2, d]
                    k0, k1 = stored_to_float(k[j0, g, d]), stored_to_float(k[j1, g, d])
                    k2, k3 = stored_to_float(k[j2, g, d]), stored_to_float(k[j3, g, d])
                    a0 += x * k0
                    a1 += x * k1
                    a2 += x * k2
                    a3 += x * k3
                    b0 += y * k0
                    b1 += y * k1
                    b2 += y * k2
                    b3 += y * k3
                    c0 += z * k0
                    c1 += z * k1
                    c2 += z * k2
                    c3 += z * k3
                dots[r, t], dots[r, t + 1], dots[r, t + 2], dots[r, t + 3] = a0, a1, a2, a3
                dots[r + 1, t], dots[r + 1, t + 1], dots[r + 1, t + 2], dots[r + 1, t + 3] = b0, b1, b2, b3
                dots[r + 2, t], dots[r + 2, t + 1], dots[r + 2, t + 2], dots[r + 2, t + 3] = c0, c1, c2, c3
            elif h < group:
                h0, r = g * group + h, r0 + h
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for d in range(head_dim):
                    x = q[i, h0, d]
                    a0 += x * stored_to_float(k[j0, g, d])
                    a1 += x * stored_to_float(k[j1, g, d])
                    a2 += x * stored_to_float(k[j2, g, d])
                    a3 += x * stored_to_float(k[j3, g, d])
                dots[r, t], dots[r, t + 1], dots[r, t + 2], dots[r, t + 3] = a0, a1, a2, a3


@numba.njit(cache=True, nogil=True, fastmath=FAST_REDUCTION)
def _chunk_accumulate(v, g, keys, active, width, weights, acc):
    """acc[row] += sum over t of weights[row, t] * v[keys[t], g], over the active groups of four."""
    rows, head_dim = acc.shape
    for t in range(0, width, 4):
        if not active[t // 4]:
            continue
        j0, j1, j2, j3 = keys[t], keys[t + 1], keys[t + 2], keys[t + 3]
        for r in range(rows):
            p0, p1, p2, p3 = weights[r, t], weights[r, t + 1], weights[r, t + 2], weights[r, t + 3]
            # Adding zeros would change nothing but the time.
            if p0 == 0.0 and p1 == 0.0 and p2 == 0.0 and p3 == 0.0:
                continue
            for d in range(head_dim):
                acc[r, d] += (p0 * stored_to_float(v[j0, g, d]) + p1 * stored_to_float(v[j1, g, d])) + (
                    p2 * stored_to_float(v[j2, g, d]) + p3 * stored_to_float(v[j3, g, d])
                )


@numba.njit(cache=True, nogil=True, fastmath=FAST_REDUCTION)
def _attend_run(
    q,
    q_sink,
    k,
    v,
    q_pos,
    k_pos,
    scale,
    window,
    n_sink,
    g,
    first_query,
    stop_query,
    order,
    chunks,
    first_chunk,
    stop_chunk,
    entries,
    flags,
    scores,
    running_max,
    running_sum,
    acc,
):
    """Online softmax of queries [first_query, stop_query) x kv head g's query heads over the
    chunks [first_chunk, stop_chunk) of _key_layout: leaves each row's running max, running sum
    of exp(score - max) and unnormalised weighted sum of values. Sink chunks are scored with
    q_sink, and no window. entries [2, KEY_CHUNK], flags [3, KEY_CHUNK] and scores [rows,
    KEY_CHUNK] are work space."""
    rows = running_max.shape[0]
    group = q.shape[1] // k.shape[1]
    n_sink_chunks = (n_sink + KEY_CHUNK - 1) // KEY_CHUNK
    lowest_query = q_pos[first_query]
    highest_query = q_pos[first_query]
    for i in range(first_query, stop_query):
        lowest_query = min(lowest_query, q_pos[i])
        highest_query = max(highest_query, q_pos[i])
    running_max[:] = -np.inf
    running_sum[:] = 0.0
    acc[:, :] = 0.0
    # Entry t of the chunk: its slot (-1: not held), the slot read for it (a held one of its
    # group when it is not), whether it is held in a group some query sees, and whether the
    # current query sees it; then whether group t // 4 is seen at all.
    entry_slot, keys, held, visible, active = entries[0], entries[1], flags[0], flags[1], flags[2]
    for c in range(first_chunk, stop_chunk):
        sinks = c < n_sink_chunks
        chunk_window = 0 if sinks else window
        # The sink chunks' width follows n_sink alone; every other chunk spans KEY_CHUNK positions.
        width = min(KEY_CHUNK, (n_sink - c * KEY_CHUNK + 3) // 4 * 4) if sinks else KEY_CHUNK
        base = 0
        if not sinks:
            first_slot = chunks[c] if order.shape[0] == 0 else order[chunks[c] - n_sink]
            base = k_pos[first_slot] // KEY_CHUNK * KEY_CHUNK
            if base > highest_query or (window != 0 and lowest_query - (base + KEY_CHUNK - 1) >= window):
                continue
        entry_slot[:width] = -1
        for x in range(chunks[c], chunks[c + 1]):
            if sinks:
                entry_slot[x - c * KEY_CHUNK] = x
            else:
                slot = x if order.shape[0] == 0 else order[x - n_sink]
                entry_slot[k_pos[slot] - base] = slot
        any_active = False
        for t in range(0, width, 4):
            stand_in = -1
            seen = False
            for e in range(t, t + 4):
                j = entry_slot[e]
                if j >= 0:
                    stand_in = j
                    key_position = k_pos[j]
                    if key_position <= highest_query and (
                        chunk_window == 0 or lowest_query - key_position < chunk_window
                    ):
                        seen = True
            active[t // 4] = seen
            any_active |= seen
            for e in range(t, t + 4):
                j = entry_slot[e]
                held[e] = seen and j >= 0
                keys[e] = j if j >= 0 else stand_in
        if not any_active:
            continue
        _chunk_dots(q_sink if sinks else q, k, g, first_query, keys, active, width, scores)
        for r0 in range(0, rows, group):
            query_position = q_pos[first_query + r0 // group]
            seen = False
            for t in range(width):
                visible[t] = held[t] and _visible(k_pos[keys[t]], query_position, chunk_window)
                seen |= visible[t]
            for r in range(r0, r0 + group):
                if not seen:
                    scores[r, :width] = 0.0
                    continue
                chunk_largest = -np.inf
                for t in range(width):
                    score = scores[r, t] * scale if visible[t] else -np.inf
                    scores[r, t] = score
                    chunk_largest = max(chunk_largest, score)
                if chunk_largest > running_max[r]:
                    rescale = np.exp(running_max[r] - chunk_largest)
                    running_sum[r] *= rescale
                    for d in range(acc.shape[1]):
                        acc[r, d] *= rescale
                    running_max[r] = chunk_largest
                # Always the whole width, so the sum splits the same way whatever the block skipped.
                total = 0.0
                for t in range(width):
                    p = np.exp(scores[r, t] - running_max[r]) if visible[t] else np.float32(0.0)
                    scores[r, t] = p
                    total += np.float64(p)
                running_sum[r] += total
        _chunk_accumulate(v, g, keys, active, width, scores, acc)


@numba.njit(cache=True, nogil=True)
def _fold(acc, largest, total, run_acc, run_max, run_sum):
    """Merge a run's partial softmax into that of the runs before it: returns the new (largest,
    total) and updates acc. Strict IEEE (no fastmath), so it rounds the same in every caller."""
    if run_max == -np.inf:
        return largest, total
    if largest == -np.inf:
        acc[:] = run_acc
        return run_max, run_sum
    new_largest = max(largest, run_max)
    weight = np.exp(np.float64(largest) - new_largest)
    run_weight = np.exp(np.float64(run_max) - new_largest)
    weight32, run_weight32 = np.float32(weight), np.float32(run_weight)
    for d in range(acc.shape[0]):
        acc[d] = acc[d] * weight32 + run_acc[d] * run_weight32
    return new_largest, total * weight + run_sum * run_weight


@numba.njit(cache=True, nogil=True)
def _normalise(acc, largest, total):
    if largest == -np.inf:
        acc[:] = 0.0
        return
    inverse = np.float32(1.0 / total)
    for d in range(acc.shape[0]):
        acc[d] *= inverse


@numba.njit(cache=True, nogil=True, parallel=True)
def _attention_kernel(
    q, q_sink, k, v, q_pos, k_pos, scale, window, n_sink, queries_per_block, split, order, chunks, runs, out
):
    n, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    n_blocks = (n + queries_per_block - 1) // queries_per_block
    n_runs = runs.shape[0] - 1
    n_parts = n_runs if split else 0
    part_max = np.empty((n_parts, n, n_heads), dtype=np.float32)
    part_sum = np.empty((n_parts, n, n_heads), dtype=np.float64)
    part_acc = np.empty((n_parts, n, n_heads, head_dim), dtype=np.float32)
    n_tasks = max(n_parts, 1)
    for task in numba.prange(n_blocks * n_kv_heads * n_tasks):
        part = task % n_tasks
        g = (task // n_tasks) % n_kv_heads
        slot = task // (n_tasks * n_kv_heads)
        # Causal masking makes late query blocks the expensive ones; interleave early and late
        # blocks so each thread's contiguous share of tasks carries about the same work.
        block = slot // 2 if slot % 2 == 0 else n_blocks - 1 - slot // 2
        first_query = block * queries_per_block
        stop_query = min(first_query + queries_per_block, n)
        rows = (stop_query - first_query) * group
        running_max = np.empty(rows, dtype=np.float32)
        running_sum = np.empty(rows, dtype=np.float64)
        acc = np.empty((rows, head_dim), dtype=np.float32)
        largest = np.full(rows, -np.inf, dtype=np.float32)
        total = np.zeros(rows, dtype=np.float64)
        entries = np.empty((2, KEY_CHUNK), dtype=np.int64)
        flags = np.empty((3, KEY_CHUNK), dtype=np.bool_)
        scores = np.empty((rows, KEY_CHUNK), dtype=np.float32)
        for run in range(part, part + 1 if split else n_runs):
            _attend_run(
                q,
                q_sink,
                k,
                v,
                q_pos,
                k_pos,
                scale,
                window,
                n_sink,
                g,
                first_query,
                stop_query,
                order,
                chunks,
                runs[run],
                runs[run + 1],
                entries,
                flags,
                scores,
                running_max,
                running_sum,
                acc,
            )
            for r in range(rows):
                i, h = first_query + r // group, g * group + r % group
                if split:
                    part_max[part, i, h] = running_max[r]
                    part_sum[part, i, h] = running_sum[r]
                    part_acc[part, i, h, :] = acc[r]
                else:
                    folded = _fold(out[i, h], largest[r], total[r], acc[r], running_max[r], running_sum[r])
                    largest[r], total[r] = folded
        if not split:
            for r in range(rows):
                _normalise(out[first_query + r // group, g * group + r % group], largest[r], total[r])
    if split:
        for task in numba.prange(n * n_heads):
            i, h = task // n_heads, task % n_heads
            largest_one, total_one = np.float32(-np.inf), 0.0
            for run in range(n_runs):
                largest_one, total_one = _fold(
                    out[i, h], largest_one, total_one, part_acc[run, i, h], part_max[run, i, h], part_sum[run, i, h]
                )
            _normalise(out[i, h], largest_one, total_one)


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_pos: np.ndarray,
    k_pos: np.ndarray,
    *,
    scale: float,
    window: int = 0,
    q_sink: np.ndarray | None = None,
    n_sink: int = 0,
    out=None,
) -> np.ndarray:
    """softmax(q k^T * scale + mask) v for q [n, H, D] over the cache k, v [S, KV, D].

    Query head h reads kv head h // (H // KV). q_pos [n] and k_pos [S] are int32 or int64
    positions; see the module docstring for the mask and for the sink slots [0, n_sink), scored
    with q_sink [n, H, D]. k and v are float32 or float16. Returns out [n, H, D].
    """
    check_f32("q", q, 3)
    if isinstance(k, np.ndarray) and isinstance(v, np.ndarray) and k.dtype != v.dtype:
        raise KernelError(f"k and v must have the same dtype, got {k.dtype} and {v.dtype}")
    k = _check_store("k", k)
    v = _check_store("v", v)
    n, n_heads, head_dim = q.shape
    n_keys, n_kv_heads, _ = k.shape
    scale, window, n_sink = check_attention_arguments(q.shape, k.shape, v.shape, scale, window, n_sink)
    q_pos = check_positions("q_pos", q_pos, n)
    k_pos = check_positions("k_pos", k_pos, n_keys)
    if q_pos.dtype != k_pos.dtype:
        q_pos, k_pos = q_pos.astype(np.int64), k_pos.astype(np.int64)
    if q_sink is None:
        if n_sink:
            raise KernelError("n_sink > 0 needs q_sink")
        q_sink = q
    else:
        check_f32("q_sink", q_sink, 3)
        if q_sink.shape != q.shape:
            raise KernelError(f"q_sink must have the shape of q {q.shape}, got {q_sink.shape}")
    out = check_out(out, q.shape)
    if any(np.may_share_memory(out, a) for a in (q, q_sink, k, v)):
        raise KernelError("out must not overlap q, k or v")
    if n == 0 or n_heads == 0 or head_dim == 0:
        return out
    if n_keys == 0:
        out.fill(0.0)
        return out
    group = n_heads // n_kv_heads
    queries_per_block = max(1, _ROWS_PER_BLOCK // group)
    n_blocks = math.ceil(n / queries_per_block)
    order, chunks, runs = _key_layout(k_pos, n_sink)
    n_runs = len(runs) - 1
    # Runs get tasks of their own when (query block, kv head) tasks alone cannot keep every
    # thread busy: decode has just one per kv head. Either way gives the same bits.
    split = (
        n_runs > 1
        and n_blocks * n_kv_heads < _TASKS_PER_THREAD * get_threads()
        and n_runs * n * n_heads * head_dim <= _MAX_PARTIAL_FLOATS
    )
    apply_threads()
    _attention_kernel(
        q,
        q_sink,
        k,
        v,
        q_pos,
        k_pos,
        np.float32(scale),
        window,
        n_sink,
        queries_per_block,
        split,
        order,
        chunks,
        runs,
        out,
    )
    return out


def _check_store(name: str, a) -> np.ndarray:
    """k or v as the kernel reads it: float32 as it is, float16 as its uint16 bits."""
    if isinstance(a, np.ndarray) and a.dtype == np.float16:
        if a.ndim != 3:
            raise KernelError(f"{name} must be 3-D, got shape {a.shape}")
        if not a.flags.c_contiguous:
            raise KernelError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
        return a.view(np.uint16)
    return check_f32(name, a, 3)
