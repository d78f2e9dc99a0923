"""Benchmark the CPU product kernels against this machine's memory bandwidth.

    python benchmarks/kernels.py [--formats Q4_K Q8_0 ...] [--quick] [--skip-compile]

Prints, per format: matvec weight GB/s (what decoding runs: activation rounding, then the
integer kernel where there is one, as for matmul) on the qwen2.5-coder-1.5b shapes and its ratio
to the read bandwidth measured just before it. Each shape cycles through as many random matrices as fill a 1 GB
pool, as a decode step goes through a whole model: with a working set of a few times the L3
cache, part of it stays cached from one pass to the next, and a kernel "reads" faster than the
memory can deliver (Q8_0 at 1.1x the streaming sum with 128 MB); matmul GFLOP/s
(2*rows*cols*n / s), with the dequantize-to-BLAS alternative for comparison; and the cold and
warm compile time of the whole kernel set.
Numbers on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from rich.console import Console
from rich.table import Table

from localllm.formats.quants import LAYOUTS
from localllm.kernels.cpu import KERNELS, get_threads, integer
from localllm.kernels.cpu.activations import quantize_activations
from localllm.kernels.cpu.bandwidth import read_bandwidth
from localllm.kernels.cpu.products import INTEGER_PRODUCTS

# Long enough for OpenBLAS's spinning threads to go to sleep.
BLAS_SETTLE_SECONDS = 0.5
SHAPES = [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960), (151936, 1536)]
QUICK_SHAPES = [(1536, 1536), (8960, 1536)]
BATCHES = [1, 4, 16, 64, 128, 512]
QUICK_BATCHES = [1, 16, 128]
# Distinct weight bytes per shape: as much as the streaming sum reads, so that every pass
# streams from DRAM (L3 is 32 MB).
WORKING_SET = 1 << 30
BLAS_TILE_ROWS = 512


SCALE_TABLE = 4096


def set_scales(qtype: GGMLQuantizationType, blocks: np.ndarray, rng: np.random.Generator) -> None:
    """Finite, modest f16 scales in every scale field of `blocks` (uint8[n, type_size]), from a
    table of random ones repeated (drawing one per block of a 1 GB pool would take seconds)."""
    for field in LAYOUTS[qtype].scale_fields:
        table = rng.uniform(0.001, 0.05, size=SCALE_TABLE).astype(np.float16).view(np.uint8).reshape(-1, 2)
        blocks[:, field.offset : field.offset + 2] = np.resize(table, (blocks.shape[0], 2))


def random_raw(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks with finite, modest f16 scales (random bytes elsewhere)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if qtype == GGMLQuantizationType.F32:
        return rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint8)
    if qtype == GGMLQuantizationType.F16:
        return rng.standard_normal((rows, cols), dtype=np.float32).astype(np.float16).view(np.uint8)
    if qtype == GGMLQuantizationType.BF16:
        values = rng.standard_normal((rows, cols), dtype=np.float32)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    set_scales(qtype, blocks, rng)
    return blocks.reshape(rows, -1)


def pool_matrices(
    pool: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """As many read-only rows x cols `qtype` matrices as fit in `pool` (random bytes), one after
    another; at least two, the second a fresh array when one matrix fills the pool."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    nbytes = rows * cols // block_size * type_size
    matrices = []
    for start in range(0, pool.nbytes - nbytes + 1, nbytes):
        matrix = pool[start : start + nbytes].reshape(rows, -1)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            matrix[:] = random_raw(qtype, rows, cols, rng)
        else:
            set_scales(qtype, matrix.reshape(-1, type_size), rng)
        matrices.append(matrix)
    while len(matrices) < 2:
        matrices.append(random_raw(qtype, rows, cols, rng))
    for matrix in matrices:
        matrix.flags.writeable = False
    return matrices


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def rounded_product(qtype, n):
    """What products.matvec (n = 1) or matmul runs on 8-bit-rounded activations, rounding
    included: the integer kernel where there is one, else the float kernel."""
    if qtype in INTEGER_PRODUCTS:
        return INTEGER_PRODUCTS[qtype]
    kernel = KERNELS[qtype][0 if n == 1 else 1]
    if n == 1:
        return lambda raw, X, out: kernel(raw, quantize_activations(X[0], qtype), out[0])
    return lambda raw, X, out: kernel(raw, quantize_activations(X, qtype), out)


def kernel_layout(qtype, raw: np.ndarray) -> np.ndarray:
    """The file's bytes as the kernel that multiplies them reads them (integer.pack: a copy for
    the formats it repacks, as a model's CheckedWeight makes once)."""
    return integer.pack(qtype, raw) if qtype in INTEGER_PRODUCTS else raw


def bench_matvec(qtype, shapes, probe_bytes, pool, quick, rng):
    """Per shape: weight GB/s, and its ratio to the read bandwidth measured just before it. On
    a shared host the probe moves between runs (33-36 and 62-65 GB/s on the same two cores,
    within an hour), more than the kernels do, so each ratio takes its own probe."""
    matvec_kernel = rounded_product(qtype, 1)
    row = [qtype.name + (" (integer)" if qtype in INTEGER_PRODUCTS else "")]
    for rows, cols in shapes:
        matrices = [kernel_layout(qtype, raw) for raw in pool_matrices(pool, qtype, rows, cols, rng)]
        x = rng.standard_normal((1, cols), dtype=np.float32)
        out = np.empty((1, rows), dtype=np.float32)

        def cycle():
            for raw in matrices:
                matvec_kernel(raw, x, out)

        bandwidth = read_bandwidth(probe_bytes)
        seconds = best_time(cycle, 2 if quick else 4) / len(matrices)
        rate = rows * cols // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1] / seconds / 1e9
        row.append(f"{rate:.1f} ({rate / bandwidth:.2f} of {bandwidth:.1f})")
    return row


def blas_matmul(dequantize_rows, raw, X, out):
    """X @ W.T with W dequantized BLAS_TILE_ROWS rows at a time."""
    rows = raw.shape[0]
    tile = np.empty((BLAS_TILE_ROWS, X.shape[1]), dtype=np.float32)
    for start in range(0, rows, BLAS_TILE_ROWS):
        stop = min(rows, start + BLAS_TILE_ROWS)
        ids = np.arange(start, stop, dtype=np.int64)
        dequantize_rows(raw, ids, tile[: stop - start])
        np.matmul(X, tile[: stop - start].T, out=out[:, start:stop])


def bench_matmul(qtype, shapes, batches, quick, rng):
    dequantize_rows = KERNELS[qtype][2]
    lines = []
    for rows, cols in shapes:
        raw = random_raw(qtype, rows, cols, rng)
        raw.flags.writeable = False
        packed = kernel_layout(qtype, raw)
        cases = []
        for n in batches:
            X = rng.standard_normal((n, cols), dtype=np.float32)
            out = np.empty((n, rows), dtype=np.float32)
            flops = 2.0 * rows * cols * n
            repeats = 1 if flops > 2e11 else (2 if quick else 3)
            product = rounded_product(qtype, n)
            seconds = best_time(lambda: product(packed, X, out), repeats)
            cases.append((n, X, out, flops, repeats, f"{flops / seconds / 1e9:.1f}"))
        # BLAS last: its idle threads spin for a while after each call and would slow
        # whatever runs next on these two cores.
        line = [f"{qtype.name} {rows}x{cols}"]
        for n, X, out, flops, repeats, cell in cases:
            if n >= 64:
                blas = best_time(lambda: blas_matmul(dequantize_rows, raw, X, out), repeats)
                cell += f" / {flops / blas / 1e9:.1f}"
            line.append(cell)
        lines.append(line)
        time.sleep(BLAS_SETTLE_SECONDS)
    return lines


def compile_times() -> tuple[float, float]:
    """Seconds for warm_up() in a fresh interpreter with an empty, then a filled, Numba cache."""
    script = "from localllm.kernels.cpu.warmup import warm_up; warm_up()"
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        results = []
        for _ in range(2):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", script], env=env, check=True)
            results.append(time.perf_counter() - start)
    return results[0], results[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", help="type names, e.g. Q4_K Q8_0 (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, batches and repeats")
    parser.add_argument("--skip-compile", action="store_true", help="do not time cold/warm compiles")
    args = parser.parse_args(argv)

    console = Console()
    known = {qtype.name: qtype for qtype in KERNELS}
    names = args.formats or list(known)
    unknown = [name for name in names if name.upper() not in known]
    if unknown:
        parser.error(f"unknown formats {unknown}; available: {' '.join(known)}")
    formats = [known[name.upper()] for name in names]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    batches = QUICK_BATCHES if args.quick else BATCHES
    rng = np.random.default_rng(0)

    console.print(f"threads: {get_threads()}; numbers on a shared machine are indicative")
    probe_bytes = 1 << 28 if args.quick else 1 << 30

    for qtype in formats:
        rounded_product(qtype, 1)(
            random_raw(qtype, 2, 256, rng), np.zeros((1, 256), np.float32), np.empty((1, 2), np.float32)
        )

    pool = rng.integers(0, 256, size=WORKING_SET, dtype=np.uint8)
    table = Table(
        title=f"matvec: weight GB/s (ratio of the read bandwidth probed before it), {pool.nbytes >> 20} MB of weights"
    )
    table.add_column("format")
    for rows, cols in shapes:
        table.add_column(f"{rows}x{cols}", justify="right")
    for qtype in formats:
        table.add_row(*bench_matvec(qtype, shapes, probe_bytes, pool, args.quick, rng))
    console.print(table)
    del pool

    table = Table(title="matmul GFLOP/s (kernel / dequantize+BLAS for n >= 64)")
    table.add_column("format, shape")
    for n in batches:
        table.add_column(f"n={n}", justify="right")
    for qtype in formats:
        for line in bench_matmul(qtype, shapes, batches, args.quick, rng):
            table.add_row(*line)
    console.print(table)

    if not args.skip_compile:
        cold, warm = compile_times()
        console.print(f"warm_up(): cold cache {cold:.1f} s, warm cache {warm:.1f} s")


if __name__ == "__main__":
    main()
