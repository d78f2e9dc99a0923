"""Throughput of the CPU ops: norms, RoPE, softmax, gated activations and attention.

Run: python benchmarks/ops.py [--threads N] [--cache 4096]

Shapes follow qwen2.5-coder-1.5b (hidden 1536, 12 query heads, 2 kv heads, head_dim 128, FFN 8960,
vocab 151936). Each figure is the best of several runs; on a shared machine expect noise.
"""

import argparse
import time

import numpy as np

from localllm.kernels.cpu.attention import attention
from localllm.kernels.cpu.bandwidth import read_bandwidth
from localllm.kernels.cpu.ops import geglu, rms_norm, rope, softmax, swiglu, warm_up_ops
from localllm.kernels.cpu.threads import get_threads, set_threads

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 1536, 12, 2, 128, 8960, 151936
DECODE_WORKING_SET = 256 << 20


def best_seconds(run, min_total=0.3, min_repeats=5) -> float:
    run()
    best, total, repeats = float("inf"), 0.0, 0
    while total < min_total or repeats < min_repeats:
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        best, total, repeats = min(best, elapsed), total + elapsed, repeats + 1
    return best


def report(name: str, seconds: float, detail: str) -> None:
    print(f"{name:<44} {seconds * 1e6:>10.1f} us   {detail}")


def bench_elementwise(rng) -> None:
    for n in (1, 512):
        x = rng.standard_normal((n, HIDDEN), dtype=np.float32)
        weight = rng.standard_normal(HIDDEN, dtype=np.float32)
        out = np.empty_like(x)
        t = best_seconds(lambda: rms_norm(x, weight, 1e-6, out=out))
        report(f"rms_norm n={n} d={HIDDEN}", t, f"{3 * x.nbytes / t / 1e9:6.2f} GB/s moved")

        q = rng.standard_normal((n, HEADS, HEAD_DIM), dtype=np.float32)
        positions = np.arange(30000, 30000 + n, dtype=np.int32)
        t = best_seconds(lambda: rope(q, positions, n_rot=HEAD_DIM, base=1e6, neox=True))
        report(f"rope n={n} heads={HEADS} head_dim={HEAD_DIM}", t, f"{n * HEADS / t / 1e6:6.2f} M head-vectors/s")

        gate = rng.standard_normal((n, FFN), dtype=np.float32)
        up = rng.standard_normal((n, FFN), dtype=np.float32)
        out = np.empty_like(gate)
        for op in (swiglu, geglu):
            t = best_seconds(lambda: op(gate, up, out=out))
            report(
                f"{op.__name__} n={n} f={FFN}",
                t,
                f"{3 * gate.nbytes / t / 1e9:6.2f} GB/s moved, {gate.size / t / 1e9:5.2f} G/s",
            )

    for shape in ((1, VOCAB), (512, 512)):
        x = rng.standard_normal(shape, dtype=np.float32) * 5
        out = np.empty_like(x)
        t = best_seconds(lambda: softmax(x, out=out))
        report(f"softmax {shape[0]}x{shape[1]}", t, f"{x.size / t / 1e9:5.2f} G values/s")


def bench_decode(rng, cache: int, bandwidth: float) -> None:
    # One cache per layer, visited in turn as a forward pass does, and together larger than the
    # last-level cache: otherwise the K/V rows would be served from cache, not memory.
    layer_bytes = 2 * cache * KV_HEADS * HEAD_DIM * 4
    n_layers = max(2, -(-DECODE_WORKING_SET // layer_bytes))
    layers = [
        (
            rng.standard_normal((cache, KV_HEADS, HEAD_DIM), dtype=np.float32),
            rng.standard_normal((cache, KV_HEADS, HEAD_DIM), dtype=np.float32),
        )
        for _ in range(n_layers)
    ]
    k_pos = np.arange(cache, dtype=np.int32)
    q = rng.standard_normal((1, HEADS, HEAD_DIM), dtype=np.float32)
    q_pos = np.array([cache - 1], dtype=np.int32)
    out = np.empty_like(q)

    def all_layers():
        for k, v in layers:
            attention(q, k, v, q_pos, k_pos, scale=HEAD_DIM**-0.5, out=out)

    t = best_seconds(all_layers) / n_layers
    kv_rate = layer_bytes / t / 1e9
    report(
        f"decode attention S={cache} H={HEADS} KV={KV_HEADS} D={HEAD_DIM}",
        t,
        f"{kv_rate:6.2f} GB/s of K/V = {kv_rate / bandwidth:5.2f} x read bandwidth ({n_layers} layers' caches in turn)",
    )


def bench_prefill(rng, n: int) -> None:
    k = rng.standard_normal((n, KV_HEADS, HEAD_DIM), dtype=np.float32)
    v = rng.standard_normal((n, KV_HEADS, HEAD_DIM), dtype=np.float32)
    q = rng.standard_normal((n, HEADS, HEAD_DIM), dtype=np.float32)
    positions = np.arange(n, dtype=np.int32)
    out = np.empty_like(q)
    t = best_seconds(lambda: attention(q, k, v, positions, positions, scale=HEAD_DIM**-0.5, out=out), min_repeats=3)
    # q.k and p.v: 2 flops per multiply-add each, over the n(n+1)/2 visible (query, key) pairs.
    flops = 4 * HEAD_DIM * HEADS * n * (n + 1) / 2
    report(f"prefill attention n={n} (causal, H={HEADS} KV={KV_HEADS})", t, f"{flops / t / 1e9:6.2f} GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="kernel threads (default: LOCALLLM_THREADS)")
    parser.add_argument("--cache", type=int, default=4096, help="KV slots for decode attention")
    args = parser.parse_args()
    if args.threads:
        set_threads(args.threads)
    warm_up_ops()
    bandwidth = read_bandwidth(256 << 20)
    print(f"threads: {get_threads()}, measured read bandwidth: {bandwidth:.2f} GB/s")
    rng = np.random.default_rng(0)
    bench_elementwise(rng)
    bench_decode(rng, args.cache, bandwidth)
    for n in (128, 512):
        bench_prefill(rng, n)


if __name__ == "__main__":
    main()
