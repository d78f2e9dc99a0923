"""`localllm quantize` speed: seconds and MB/s of output for each target type on one model.

    python benchmarks/quantize.py [MODEL] [--types Q4_K_M Q6_K] [--via Q8_0] [--dir DIR]

MODEL is a catalog name or a .gguf path (default qwen2.5-coder-1.5b-instruct). With --via, the
model is first quantized to that type (timed apart) and the targets are made from the copy, so
that weights already in a target's types are converted rather than copied. Besides MB/s of the
whole file, the line gives MB/s of the converted tensors' bytes, the part the encoders make.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from localllm.runtime.catalog import ensure_model
from localllm.runtime.quantize import quantize


def timed(source: Path, output: Path, target: str) -> str:
    start = time.perf_counter()
    plans = quantize(source, output, target)
    seconds = time.perf_counter() - start
    written = sum(p.nbytes for p in plans) / 1e6
    converted = sum(p.nbytes for p in plans if p.converted) / 1e6
    return (
        f"{target:>7}: {seconds:7.1f} s, {written:8.1f} MB written ({written / seconds:6.2f} MB/s), "
        f"{converted:8.1f} MB converted ({converted / seconds:6.2f} MB/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q6_K"])
    parser.add_argument("--via", help="quantize to this type first and start from that copy")
    parser.add_argument("--dir", type=Path, help="where the outputs go (default: a temporary directory)")
    args = parser.parse_args()
    source = Path(ensure_model(args.model))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"model: {source.name}")
        if args.via:
            copy = Path(tmp) / f"via.{args.via}.gguf"
            print(f"(via) {timed(source, copy, args.via)}")
            source = copy
        for target in args.types:
            print(timed(source, Path(tmp) / f"out.{target}.gguf", target), flush=True)
            (Path(tmp) / f"out.{target}.gguf").unlink()


if __name__ == "__main__":
    main()
