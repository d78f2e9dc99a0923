"""Achieved bandwidth of the Triton kernels (localllm.kernels.gpu) against the device's peak.

Run: python benchmarks/gpu.py [--sweep]

On a CUDA device each kernel is timed with triton.testing.do_bench (L2 flushed before every run,
median; the clocks warmed up first) and reported as bytes of weights / KV cache read per second,
and as a share of the measured peak: a device-to-device copy_ of 2 GiB, counting the bytes read
and written. "host" is the Python time of one call (validation and launch), which bounds a
decode step when kernels are this short. Shapes follow qwen2.5-coder-1.5b (hidden 1536, FFN
8960, 12 query heads, 2 kv heads, head_dim 128); matvec also runs on a 32768x4096 matrix, large
enough to leave launch latency and L2 behind.
`--sweep` also times the products under other tile sizes, to tune products.MATVEC_TILE and
products._matmul_config.

Under TRITON_INTERPRET=1 (no GPU) it only runs every kernel once on tiny shapes and says so.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import triton
import triton.testing
from gguf import GGMLQuantizationType

from localllm.formats.quants import LAYOUTS
from localllm.kernels import gpu
from localllm.kernels.gpu import products

Q = GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 1536, 8960, 12, 2, 128
# HBM bandwidth from the vendors' data sheets, bytes/s, by a word of the device name.
NOMINAL_PEAK = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "4090": 1.008e12}
SWEEP_TYPES = (Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q6_K)
# (activation rows, (activation rows, weight rows, warps) of the tiles) for --sweep.
MATMUL_SWEEP = ((16, ((16, 16, 4), (16, 32, 4), (16, 64, 4))), (128, ((64, 128, 8), (128, 64, 8), (128, 128, 8))))


class RandomWeight:
    """Random blocks of `qtype` with finite, modest f16 scales: what CheckedWeight takes."""

    def __init__(self, qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        layout = LAYOUTS[qtype]
        self.type, self.shape, self.name = qtype, (rows, cols), f"{qtype.name} {rows}x{cols}"
        if qtype == Q.F32:
            self.raw = rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint8)
            return
        if qtype == Q.F16:
            self.raw = rng.standard_normal((rows, cols), dtype=np.float32).astype(np.float16).view(np.uint8)
            return
        if qtype == Q.BF16:
            values = rng.standard_normal((rows, cols), dtype=np.float32)
            self.raw = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
            return
        n_blocks = rows * cols // layout.block_size
        blocks = rng.integers(0, 256, size=(n_blocks, layout.type_size), dtype=np.uint8)
        for field in layout.scale_fields:
            scales = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
            blocks[:, field.offset : field.offset + 2] = scales.view(np.uint8).reshape(-1, 2)
        self.raw = blocks.reshape(rows, -1)


def measure(fn) -> float:
    """Seconds per call: the median of do_bench's runs, each after an L2 flush."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def host_seconds(fn, calls: int = 100) -> float:
    """Python time per call, launches queued without waiting for the device."""
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - started) / calls
    torch.cuda.synchronize()
    return elapsed


def warm_up_clocks(device, seconds: float = 1.5) -> None:
    """Keep the device busy until its clocks have risen: the first timings are slow otherwise."""
    a = torch.randn((4096, 4096), device=device, dtype=torch.float16)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ a
    torch.cuda.synchronize()


def copy_peak(device) -> float:
    source = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() / measure(lambda: target.copy_(source))


HEADER = f"{'time':>12} {'bandwidth':>13} {'peak':>6} {'host':>10}"


def row(name: str, fn, nbytes: int, peak: float, extra=None) -> None:
    seconds = measure(fn)
    bandwidth = nbytes / seconds
    detail = "" if extra is None else extra(seconds)
    print(
        f"{name:<42} {seconds * 1e6:>9.1f} us {bandwidth / 1e9:>8.0f} GB/s {bandwidth / peak:>6.0%} "
        f"{host_seconds(fn) * 1e6:>7.1f} us  {detail}"
    )


def bench_products(device, peak: float) -> None:
    print(f"\n{'matvec / matmul':<42} {HEADER}")
    for qtype in sorted(gpu.SUPPORTED_TYPES, key=lambda t: t.value):
        if qtype == Q.BF16:
            continue
        for rows, cols in ((FFN, HIDDEN), (HIDDEN, HIDDEN), (32768, 4096)):
            weight = gpu.CheckedWeight(RandomWeight(qtype, rows, cols), device=device)
            x = torch.randn(cols, device=device)
            row(f"matvec {qtype.name} {rows}x{cols}", lambda w=weight, x=x: gpu.matvec(w, x), weight.raw.numel(), peak)
            del weight
    for qtype in (Q.F16, Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q6_K):
        weight = gpu.CheckedWeight(RandomWeight(qtype, FFN, HIDDEN), device=device)
        for n in (4, 16, 128):
            X = torch.randn((n, HIDDEN), device=device)
            flops = 2 * n * FFN * HIDDEN
            row(
                f"matmul {qtype.name} n={n} {FFN}x{HIDDEN}",
                lambda w=weight, X=X: gpu.matmul(w, X),
                weight.raw.numel(),
                peak,
                lambda seconds, flops=flops: f"{flops / seconds / 1e12:.1f} TFLOP/s",
            )


def bench_sweep(device, peak: float) -> None:
    """Other tile sizes than the defaults, each checked against the default's output."""
    print(f"\n{'sweep (max |diff| vs default in brackets)':<42} {HEADER}")
    default = products.MATVEC_TILE, products._matmul_config
    for qtype in SWEEP_TYPES:
        weight = gpu.CheckedWeight(RandomWeight(qtype, FFN, HIDDEN), device=device)
        for n in (1, 4, 8):
            X = torch.randn((n, HIDDEN), device=device)
            want = gpu.matmul(weight, X)
            for tile in (2048, 4096, 8192, 16384):
                products.MATVEC_TILE = tile
                diff = (gpu.matmul(weight, X) - want).abs().max().item()
                name = f"  matvec {qtype.name} n={n} tile={tile} [{diff:.1e}]"
                row(name, lambda w=weight, X=X: gpu.matmul(w, X), weight.raw.numel(), peak)
            products.MATVEC_TILE = default[0]
        for n, configs in MATMUL_SWEEP:
            X = torch.randn((n, HIDDEN), device=device)
            want = gpu.matmul(weight, X)
            for block_n, block_r, warps in configs:
                config = (block_n, block_r, warps)
                products._matmul_config = lambda n, units, g, host, c=config: (c[0], c[1], max(1, 32 // g.lanes), c[2])
                try:
                    diff = (gpu.matmul(weight, X) - want).abs().max().item()
                    name = f"  matmul {qtype.name} n={n} {block_n}x{block_r} w{warps} [{diff:.1e}]"
                    row(name, lambda w=weight, X=X: gpu.matmul(w, X), weight.raw.numel(), peak)
                except Exception as error:  # a config that does not compile: report it, try the next
                    print(f"  matmul {qtype.name} n={n} {block_n}x{block_r} w{warps}: {type(error).__name__}")
            products._matmul_config = default[1]


def bench_attention(device, peak: float) -> None:
    print(f"\n{'attention (f16 KV cache, bytes of K and V)':<42} {HEADER}")
    for n_keys in (1024, 8192, 32768):
        k = torch.randn((n_keys, KV_HEADS, HEAD_DIM), device=device).half()
        v = torch.randn_like(k)
        k_pos = torch.arange(n_keys, dtype=torch.int32, device=device)
        for n in (1, 256):
            if n > 1 and n_keys > 8192:
                continue
            q = torch.randn((n, HEADS, HEAD_DIM), device=device)
            q_pos = torch.arange(n_keys - n, n_keys, dtype=torch.int32, device=device)
            flops = 4 * n * HEADS * n_keys * HEAD_DIM
            row(
                f"attention {'decode' if n == 1 else f'prefill n={n}'} over {n_keys} keys",
                lambda q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos: gpu.attention(q, k, v, q_pos, k_pos, scale=0.088),
                k.numel() * 2 * 2,
                peak,
                None if n == 1 else lambda seconds, flops=flops: f"{flops / seconds / 1e12:.1f} TFLOP/s",
            )


def bench_ops(device, peak: float) -> None:
    print(f"\n{'ops (bytes read and written)':<42} {HEADER}")
    weight = torch.randn(HIDDEN, device=device)
    for n in (1, 128):
        x = torch.randn((n, HIDDEN), device=device)
        row(f"rms_norm {n}x{HIDDEN}", lambda x=x: gpu.rms_norm(x, weight, 1e-6), 2 * x.numel() * 4 + HIDDEN * 4, peak)
        gate, up = torch.randn((n, FFN), device=device), torch.randn((n, FFN), device=device)
        row(f"swiglu {n}x{FFN}", lambda g=gate, u=up: gpu.swiglu(g, u), 3 * gate.numel() * 4, peak)


def smoke_test() -> None:
    """The interpreter: every kernel once on tiny shapes."""
    started = time.perf_counter()
    device = torch.device("cpu")
    for qtype in sorted(gpu.SUPPORTED_TYPES, key=lambda t: t.value):
        weight = gpu.CheckedWeight(RandomWeight(qtype, 4, 256), device=device)
        gpu.matvec(weight, torch.randn(256))
        gpu.matmul(weight, torch.randn((3, 256)))
        gpu.embed(weight, [1, 3])
    x = torch.randn((2, 4, 64))
    gpu.rms_norm(x, torch.randn(64), 1e-6)
    gpu.rope(x, torch.arange(2, dtype=torch.int32), n_rot=64, base=1e4, neox=True)
    gpu.swiglu(x[:, 0].contiguous(), x[:, 1].contiguous())
    gpu.geglu(x[:, 0].contiguous(), x[:, 1].contiguous())
    gpu.softmax(x[:, 0].contiguous())
    k = torch.randn((40, 2, 64)).half()
    for n in (1, 8):
        gpu.attention(x.new_zeros((n, 4, 64)).normal_(), k, k, torch.arange(40 - n, 40), torch.arange(40), scale=0.125)
    elapsed = time.perf_counter() - started
    print(f"TRITON_INTERPRET=1: every GPU kernel ran once on tiny shapes in {elapsed:.1f} s (no timings without a GPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time the products under other tile sizes")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0") or not torch.cuda.is_available():
        smoke_test()
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    warm_up_clocks(device)
    peak = copy_peak(device)
    nominal = next((value for key, value in NOMINAL_PEAK.items() if key in name), None)
    print(f"{name}: measured copy peak {peak / 1e9:.0f} GB/s (read + write)", end="")
    print(f", nominal {nominal / 1e9:.0f} GB/s" if nominal else "")
    print(f"triton {triton.__version__}, torch {torch.__version__}, dot precision {products.DOT_PRECISION}")
    bench_products(device, peak)
    bench_attention(device, peak)
    bench_ops(device, peak)
    if args.sweep:
        bench_sweep(device, peak)


if __name__ == "__main__":
    main()
