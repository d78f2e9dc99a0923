"""Grouped-query attention over a KV cache whose slots carry explicit positions.

Key j is visible to query i iff k_pos[j] <= q_pos[i] and (window == 0 or q_pos[i] - k_pos[j] <
window): llama.cpp's causal mask and its sliding-window (SWA) mask. The cache may evict and
renumber slots, so k_pos is never assumed sorted or contiguous. A query that sees no key gets zeros.

Attention sinks (StreamingLLM): the first `n_sink` slots are scored against `q_sink` instead of q
and are exempt from the window. The caller rotates q_sink for the query's position inside a
streaming cache, while q is rotated for its position in the text, as the window's keys are.

K and V are float32 or f16; f16 arrives as its uint16 bits and is widened as it is read, so a
decode step never copies the cache.

Tasks are (block of queries, kv head, run of keys): each reads its K/V rows once for every query
head of the group and every query of the block, streaming them in chunks through an online
(running max / running sum) softmax, so memory stays O(queries x chunk). Keys are split into runs
only when there are too few (block, kv head) tasks to keep the threads busy, as in decode; the
runs' partial softmaxes are merged at the end.
"""

import math

import numba
import numpy as np

from localllm.errors import KernelError
from localllm.kernels.cpu.floats import stored_to_float
from localllm.kernels.cpu.ops import FAST_REDUCTION, check_f32, check_finite_float, check_out, check_positions
from localllm.kernels.cpu.threads import apply_threads, get_threads

# Keys per chunk of the online softmax; with (query, head) rows per task it bounds the score
# buffer, and rows x head_dim floats of accumulator should stay in L1/L2.
KEY_CHUNK = 128
_ROWS_PER_BLOCK = 32
# Keys are split across tasks only while there are fewer than this many tasks per thread, and
# never into runs shorter than _MIN_KEYS_PER_SPLIT (merging the partial softmaxes costs a pass).
_TASKS_PER_THREAD = 4
_MIN_KEYS_PER_SPLIT = 256


@numba.njit(cache=True, nogil=True, inline="always")
def _visible(key_position, query_position, window):
    if key_position > query_position:
        return False
    return window == 0 or query_position - key_position < window


@numba.njit(cache=True, nogil=True, fastmath=FAST_REDUCTION)
def _chunk_scores(q, k, q_pos, k_pos, scale, window, g, first_query, keys, width, scores):
    """scores[row, t] = q[row] . k[keys[t], g] * scale, or -inf where the key is masked.

    Row r is query first_query + r // group, head g * group + r % group. The dots go two rows by
    four keys at a time so that each loaded q and k value feeds several multiply-adds.
    """
    group = q.shape[1] // k.shape[1]
    rows = scores.shape[0]
    head_dim = q.shape[2]
    t = 0
    while t + 4 <= width:
        j0, j1, j2, j3 = keys[t], keys[t + 1], keys[t + 2], keys[t + 3]
        r = 0
        while r + 2 <= rows:
            i0, h0 = first_query + r // group, g * group + r % group
            i1, h1 = first_query + (r + 1) // group, g * group + (r + 1) % group
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            for d in range(head_dim):
                x, y = q[i0, h0, d], q[i1, h1, d]
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
            scores[r, t], scores[r, t + 1], scores[r, t + 2], scores[r, t + 3] = a0, a1, a2, a3
            scores[r + 1, t], scores[r + 1, t + 1] = b0, b1
            scores[r + 1, t + 2], scores[r + 1, t + 3] = b2, b3
            r += 2
        if r < rows:
            i0, h0 = first_query + r // group, g * group + r % group
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for d in range(head_dim):
                x = q[i0, h0, d]
                a0 += x * stored_to_float(k[j0, g, d])
                a1 += x * stored_to_float(k[j1, g, d])
                a2 += x * stored_to_float(k[j2, g, d])
                a3 += x * stored_to_float(k[j3, g, d])
            scores[r, t], scores[r, t + 1], scores[r, t + 2], scores[r, t + 3] = a0, a1, a2, a3
        t += 4
    for tail in range(t, width):
        j = keys[tail]
        for r in range(rows):
            i0, h0 = first_query + r // group, g * group + r % group
            a0 = np.float32(0.0)
            for d in range(head_dim):
                a0 += q[i0, h0, d] * stored_to_float(k[j, g, d])
            scores[r, tail] = a0
    for r0 in range(0, rows, group):
        query_position = q_pos[first_query + r0 // group]
        for t in range(width):
            visible = _visible(k_pos[keys[t]], query_position, window)
            for r in range(r0, r0 + group):
                scores[r, t] = scores[r, t] * scale if visible else -np.inf


@numba.njit(cache=True, nogil=True, fastmath=FAST_REDUCTION)
def _chunk_accumulate(v, g, keys, width, weights, acc):
    """acc[row] += sum over t of weights[row, t] * v[keys[t], g], four keys per pass over acc."""
    rows, head_dim = acc.shape
    t = 0
    while t + 4 <= width:
        j0, j1, j2, j3 = keys[t], keys[t + 1], keys[t + 2], keys[t + 3]
        for r in range(rows):
            p0, p1, p2, p3 = weights[r, t], weights[r, t + 1], weights[r, t + 2], weights[r, t + 3]
            for d in range(head_dim):
                acc[r, d] += (p0 * stored_to_float(v[j0, g, d]) + p1 * stored_to_float(v[j1, g, d])) + (
                    p2 * stored_to_float(v[j2, g, d]) + p3 * stored_to_float(v[j3, g, d])
                )
        t += 4
    for tail in range(t, width):
        j = keys[tail]
        for r in range(rows):
            p = weights[r, tail]
            for d in range(head_dim):
                acc[r, d] += p * stored_to_float(v[j, g, d])


@numba.njit(cache=True, nogil=True, fastmath=FAST_REDUCTION)
def _attend_keys(
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
    key_start,
    key_stop,
    chunk,
    running_max,
    running_sum,
    acc,
):
    """Online softmax of queries [first_query, stop_query) x kv head g's query heads over the
    slots [key_start, key_stop): leaves each row's running max, running sum of exp(score - max)
    and unnormalised weighted sum of values. Sink slots (below n_sink) come in chunks of their
    own, scored with q_sink and no window."""
    rows = running_max.shape[0]
    lowest_query = q_pos[first_query]
    highest_query = q_pos[first_query]
    for i in range(first_query, stop_query):
        lowest_query = min(lowest_query, q_pos[i])
        highest_query = max(highest_query, q_pos[i])
    running_max[:] = -np.inf
    running_sum[:] = 0.0
    acc[:, :] = 0.0
    keys = np.empty(chunk, dtype=np.int64)
    scores = np.empty((rows, chunk), dtype=np.float32)
    next_key = key_start
    while next_key < key_stop:
        sinks = next_key < n_sink
        stop = min(key_stop, n_sink) if sinks else key_stop
        chunk_window = 0 if sinks else window
        # Gather the next chunk of slots some query of the block can see, so masked-out slots
        # (future ones, or ones outside every query's window) cost no arithmetic.
        width = 0
        while next_key < stop and width < chunk:
            key_position = k_pos[next_key]
            if key_position <= highest_query and (chunk_window == 0 or lowest_query - key_position < chunk_window):
                keys[width] = next_key
                width += 1
            next_key += 1
        if width == 0:
            continue
        _chunk_scores(q_sink if sinks else q, k, q_pos, k_pos, scale, chunk_window, g, first_query, keys, width, scores)
        for r in range(rows):
            chunk_largest = -np.inf
            for t in range(width):
                chunk_largest = max(chunk_largest, scores[r, t])
            if chunk_largest == -np.inf:
                for t in range(width):
                    scores[r, t] = 0.0
                continue
            if chunk_largest > running_max[r]:
                rescale = np.exp(running_max[r] - chunk_largest)
                running_sum[r] *= rescale
                for d in range(acc.shape[1]):
                    acc[r, d] *= rescale
                running_max[r] = chunk_largest
            total = 0.0
            for t in range(width):
                p = np.exp(scores[r, t] - running_max[r])
                scores[r, t] = p
                total += np.float64(p)
            running_sum[r] += total
        _chunk_accumulate(v, g, keys, width, scores, acc)


@numba.njit(cache=True, nogil=True, parallel=True)
def _attention_kernel(q, q_sink, k, v, q_pos, k_pos, scale, window, n_sink, queries_per_block, n_splits, chunk, out):
    n, n_heads, head_dim = q.shape
    n_keys, n_kv_heads = k.shape[0], k.shape[1]
    group = n_heads // n_kv_heads
    n_blocks = (n + queries_per_block - 1) // queries_per_block
    keys_per_split = (n_keys + n_splits - 1) // n_splits
    part_max = np.empty((n_splits, n, n_heads), dtype=np.float32)
    part_sum = np.empty((n_splits, n, n_heads), dtype=np.float64)
    part_acc = np.empty((n_splits, n, n_heads, head_dim), dtype=np.float32)
    for task in numba.prange(n_blocks * n_kv_heads * n_splits):
        split = task % n_splits
        g = (task // n_splits) % n_kv_heads
        slot = task // (n_splits * n_kv_heads)
        # Causal masking makes late query blocks the expensive ones; interleave early and late
        # blocks so each thread's contiguous share of tasks carries about the same work.
        block = slot // 2 if slot % 2 == 0 else n_blocks - 1 - slot // 2
        first_query = block * queries_per_block
        stop_query = min(first_query + queries_per_block, n)
        rows = (stop_query - first_query) * group
        key_start = min(split * keys_per_split, n_keys)
        key_stop = min(key_start + keys_per_split, n_keys)
        running_max = np.empty(rows, dtype=np.float32)
        running_sum = np.empty(rows, dtype=np.float64)
        acc = np.empty((rows, head_dim), dtype=np.float32)
        _attend_keys(
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
            key_start,
            key_stop,
            chunk,
            running_max,
            running_sum,
            acc,
        )
        for r in range(rows):
            i, h = first_query + r // group, g * group + r % group
            part_max[split, i, h] = running_max[r]
            part_sum[split, i, h] = running_sum[r]
            part_acc[split, i, h, :] = acc[r]
    for task in numba.prange(n * n_heads):
        i, h = task // n_heads, task % n_heads
        largest = -np.inf
        for split in range(n_splits):
            largest = max(largest, part_max[split, i, h])
        out[i, h, :] = 0.0
        if largest == -np.inf:
            continue
        total = 0.0
        for split in range(n_splits):
            if part_max[split, i, h] != -np.inf:
                weight = np.exp(np.float64(part_max[split, i, h]) - largest)
                total += part_sum[split, i, h] * weight
                for d in range(head_dim):
                    out[i, h, d] += np.float32(weight) * part_acc[split, i, h, d]
        inverse = np.float32(1.0 / total)
        for d in range(head_dim):
            out[i, h, d] *= inverse


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
    n_keys, n_kv_heads, key_dim = k.shape
    if v.shape != k.shape:
        raise KernelError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if key_dim != head_dim:
        raise KernelError(f"q head_dim is {head_dim} but k/v head_dim is {key_dim}")
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise KernelError(f"query heads ({n_heads}) must be a multiple of kv heads ({n_kv_heads})")
    q_pos = check_positions("q_pos", q_pos, n)
    k_pos = check_positions("k_pos", k_pos, n_keys)
    if q_pos.dtype != k_pos.dtype:
        q_pos, k_pos = q_pos.astype(np.int64), k_pos.astype(np.int64)
    scale = check_finite_float("scale", scale)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise KernelError(f"window must be an int >= 0 (0 = no window), got {window!r}")
    if isinstance(n_sink, bool) or not isinstance(n_sink, (int, np.integer)) or not 0 <= n_sink <= n_keys:
        raise KernelError(f"n_sink must be an int in [0, {n_keys}], got {n_sink!r}")
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
    # Split the keys too when (query block, kv head) tasks alone cannot keep every thread busy:
    # decode has just one task per kv head.
    wanted_splits = math.ceil(_TASKS_PER_THREAD * get_threads() / (n_blocks * n_kv_heads))
    n_splits = max(1, min(wanted_splits, n_keys // _MIN_KEYS_PER_SPLIT))
    apply_threads()
    _attention_kernel(
        q,
        q_sink,
        k,
        v,
        q_pos,
        k_pos,
        np.float32(scale),
        int(window),
        int(n_sink),
        queries_per_block,
        n_splits,
        KEY_CHUNK,
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
