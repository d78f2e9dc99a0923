"""Grouped-query attention over a KV cache whose slots carry explicit positions, in Triton.

The semantics are those of localllm.kernels.cpu.attention: key j is visible to query i iff
k_pos[j] <= q_pos[i] and (window == 0 or q_pos[i] - k_pos[j] < window); the first `n_sink` slots
are sinks, scored with q_sink instead of q and exempt from the window (not from causality); query
head h reads kv head h // (H // KV); a query that sees no key gets zeros; k_pos is not assumed
sorted, so visibility is decided key by key from the positions.

One online-softmax (flash-attention) kernel. A program takes a block of queries and one kv head,
so every K/V row it loads serves all the query heads of its group and all its queries; its rows
are (query, head of the group) pairs. It walks its keys in tiles, skipping the K/V loads of a tile
no row of it can see (a sliding window's old keys, a prefill's future ones). The scores and the
value sums are `tl.dot`s ("tf32x3": tensor cores at about float32 accuracy), at least 16 rows as
tl.dot needs: a decode step's few heads per kv head leave rows unused, which costs arithmetic
only, not memory traffic.

When (query block, kv head) programs are too few to occupy the device (decode), the keys are
split into ranges of their own programs (flash-decoding); each writes its running max, running
sum and unnormalised output, and a second kernel merges the ranges.

This is not batch invariant as the CPU kernel is (issue 17): a row's rounding depends on the
tiles and splits it is computed in.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from localllm.errors import KernelError
from localllm.kernels.arguments import check_attention_arguments
from localllm.kernels.gpu.ops import check_positions
from localllm.kernels.gpu.products import DOT_PRECISION, cdiv, check_out, check_tensor, next_pow2

KV_DTYPES = (torch.float16, torch.float32)
# Key ranges a decode step is split into at most, and how many of them the merge takes a step.
MAX_SPLITS = 256
MERGE_TILE = 32
# Programs per multiprocessor a launch should have before the keys are split.
PROGRAMS_PER_SM = 4


@triton.jit
def _attention_kernel(
    q,
    q_sink,
    k,
    v,
    q_pos,
    k_pos,
    out,
    part_max,
    part_sum,
    part_acc,
    n,
    n_keys,
    n_heads,
    n_kv_heads,
    head_dim,
    scale,
    window,
    n_sink,
    keys_per_split,
    GROUP: tl.constexpr,
    QPB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SINK: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT: tl.constexpr,
):
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_M)
    query = tl.program_id(0) * QPB + r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_live = (r < QPB * GROUP) & (query < n)
    d = tl.arange(0, BLOCK_D)
    d_live = d < head_dim
    row_index = query.to(tl.int64) * n_heads + head
    q_offsets = row_index[:, None] * head_dim + d[None, :]
    q_mask = row_live[:, None] & d_live[None, :]
    q_rows = tl.load(q + q_offsets, mask=q_mask, other=0.0)
    if HAS_SINK:
        q_sink_rows = tl.load(q_sink + q_offsets, mask=q_mask, other=0.0)
    query_pos = tl.load(q_pos + query, mask=row_live, other=0).to(tl.int64)

    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    first = split * keys_per_split
    stop = tl.minimum(n_keys, first + keys_per_split)
    for start in range(first, stop, BLOCK_S):
        j = start + tl.arange(0, BLOCK_S)
        j_live = j < stop
        key_pos = tl.load(k_pos + j, mask=j_live, other=0).to(tl.int64)
        is_sink = j < n_sink
        distance = query_pos[:, None] - key_pos[None, :]
        visible = (distance >= 0) & j_live[None, :] & row_live[:, None]
        visible &= (window == 0) | (distance < window) | is_sink[None, :]
        if tl.max(visible.to(tl.int32)) > 0:
            kv_offsets = (j.to(tl.int64) * n_kv_heads + kv_head)[:, None] * head_dim + d[None, :]
            kv_mask = j_live[:, None] & d_live[None, :]
            keys = tl.load(k + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.dot(q_rows, tl.trans(keys), input_precision=DOT)
            if HAS_SINK:
                if start < n_sink:
                    sink_scores = tl.dot(q_sink_rows, tl.trans(keys), input_precision=DOT)
                    s = tl.where(is_sink[None, :], sink_scores, s)
            s = tl.where(visible, s * scale, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(s, axis=1))
            # A row that has seen nothing yet keeps max -inf: exponentiate against 0 instead of NaN.
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(running_max - safe_max)
            p = tl.exp(s - safe_max[:, None])
            running_sum = running_sum * rescale + tl.sum(p, axis=1)
            values = tl.load(v + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
            acc = tl.dot(p, values, acc * rescale[:, None], input_precision=DOT)
            running_max = new_max
    if SPLIT:
        rows = n * n_heads
        part = split.to(tl.int64) * rows + row_index
        tl.store(part_max + part, running_max, mask=row_live)
        tl.store(part_sum + part, running_sum, mask=row_live)
        tl.store(part_acc + part[:, None] * head_dim + d[None, :], acc, mask=q_mask)
    else:
        seen = running_sum[:, None] > 0
        result = tl.where(seen, acc / tl.where(seen, running_sum[:, None], 1.0), 0.0)
        tl.store(out + q_offsets, result, mask=q_mask)


@triton.jit
def _merge_kernel(
    part_max, part_sum, part_acc, out, rows, head_dim, n_splits, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    largest = tl.full((), float("-inf"), dtype=tl.float32)
    total = tl.zeros((), dtype=tl.float32)
    merged = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # The key ranges' softmaxes fold like the key tiles of one: running max, rescaled sums.
    for start in range(0, n_splits, BLOCK_P):
        s = start + tl.arange(0, BLOCK_P)
        s_live = s < n_splits
        part = s.to(tl.int64) * rows + row
        maxima = tl.load(part_max + part, mask=s_live, other=float("-inf"))
        sums = tl.load(part_sum + part, mask=s_live, other=0.0)
        mask = s_live[:, None] & (d < head_dim)[None, :]
        accs = tl.load(part_acc + part[:, None] * head_dim + d[None, :], mask=mask, other=0.0)
        new = tl.maximum(largest, tl.max(maxima, axis=0))
        safe = tl.where(new == float("-inf"), 0.0, new)
        rescale = tl.exp(largest - safe)
        weights = tl.exp(maxima - safe)
        total = total * rescale + tl.sum(weights * sums, axis=0)
        merged = merged * rescale + tl.sum(weights[:, None] * accs, axis=0)
        largest = new
    result = tl.where(total > 0, merged / tl.where(total > 0, total, 1.0), 0.0)
    tl.store(out + row * head_dim + d, result, mask=d < head_dim)


def _attention_config(n: int, group: int, head_dim: int) -> tuple[int, int, int, int]:
    """(rows, keys, head dims) of a tile, and the warps.

    Timed on an H200 and checked with ptxas for sm_90 (the tf32x3 dots hold split copies of their
    operands): 16 rows for decode (tl.dot needs 16; the unused rows cost no memory traffic), 32
    for prefill, 64 keys a tile; head dims past 128 halve both to stay within registers.
    """
    block_d = max(16, next_pow2(head_dim))
    wide = block_d > 128
    block_m = max(next_pow2(group), 16 if n * group <= 16 or wide else 32)
    return block_m, 32 if wide else 64, block_d, 8


@lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter: few enough that small tests still take the split path.
    return 2


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    scale: float,
    window: int = 0,
    q_sink: torch.Tensor | None = None,
    n_sink: int = 0,
    out=None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q (n, H, D) float32 over the cache k, v (S, KV, D),
    float16 or float32, all on one device.

    Query head h reads kv head h // (H // KV). q_pos (n,) and k_pos (S,) are int32 or int64
    tensors; see the module docstring for the mask and for the sink slots [0, n_sink), scored
    with q_sink (n, H, D). Returns out (n, H, D) float32, which must not overlap the inputs.
    """
    check_tensor("q", q, 3, None)
    device = q.device
    check_tensor("k", k, 3, device, KV_DTYPES)
    check_tensor("v", v, 3, device, KV_DTYPES)
    if k.dtype != v.dtype:
        raise KernelError(f"k and v must have the same dtype, got {k.dtype} and {v.dtype}")
    n, n_heads, head_dim = q.shape
    n_keys, n_kv_heads, _ = k.shape
    scale, window, n_sink = check_attention_arguments(q.shape, k.shape, v.shape, scale, window, n_sink)
    check_positions("q_pos", q_pos, n, device)
    check_positions("k_pos", k_pos, n_keys, device)
    if q_sink is None:
        if n_sink:
            raise KernelError("n_sink > 0 needs q_sink")
    else:
        check_tensor("q_sink", q_sink, 3, device)
        if q_sink.shape != q.shape:
            raise KernelError(f"q_sink must have the shape of q {tuple(q.shape)}, got {tuple(q_sink.shape)}")
    out = check_out(out, tuple(q.shape), device)
    if n == 0 or n_heads == 0 or head_dim == 0:
        return out
    if n_keys == 0:
        return out.zero_()

    group = n_heads // n_kv_heads
    block_m, block_s, block_d, num_warps = _attention_config(n, group, head_dim)
    queries_per_block = block_m // group
    n_blocks = cdiv(n, queries_per_block)
    n_tiles = cdiv(n_keys, block_s)
    # Split the keys when the query blocks fall short of PROGRAMS_PER_SM per multiprocessor.
    programs = n_blocks * n_kv_heads
    target = PROGRAMS_PER_SM * _multiprocessors(device)
    splits = min(n_tiles, MAX_SPLITS, cdiv(target, programs)) if programs < target else 1
    tiles_per_split = cdiv(n_tiles, splits)
    splits = cdiv(n_tiles, tiles_per_split)
    split = splits > 1
    if split:
        part_max = torch.empty((splits, n * n_heads), dtype=torch.float32, device=device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty((splits, n * n_heads, head_dim), dtype=torch.float32, device=device)
    else:
        part_max = part_sum = part_acc = out
    _attention_kernel[(n_blocks, n_kv_heads, splits)](
        q,
        q if q_sink is None else q_sink,
        k,
        v,
        q_pos,
        k_pos,
        out,
        part_max,
        part_sum,
        part_acc,
        n,
        n_keys,
        n_heads,
        n_kv_heads,
        head_dim,
        scale,
        window,
        n_sink,
        tiles_per_split * block_s,
        GROUP=group,
        QPB=queries_per_block,
        BLOCK_M=block_m,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        HAS_SINK=bool(n_sink),
        SPLIT=split,
        DOT=DOT_PRECISION,
        num_warps=num_warps,
    )
    if split:
        _merge_kernel[(n * n_heads,)](
            part_max,
            part_sum,
            part_acc,
            out,
            n * n_heads,
            head_dim,
            splits,
            BLOCK_P=min(MERGE_TILE, next_pow2(splits)),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out
