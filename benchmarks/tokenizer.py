"""Tokenizer throughput: encode and decode about 1 MB of English text with each tokenizer kind.

    python benchmarks/tokenizer.py [--megabytes 1] [--text FILE]

Target: encoding 1 MB takes under 2 s for each kind.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from localllm.formats.gguf import open_gguf
from localllm.formats.tokenizer import Tokenizer
from localllm.runtime.catalog import ensure_model

MODELS = {
    "sentencepiece (gemma-3-270m)": "gemma-3-270m",
    "byte-level BPE, smollm pre (smollm2-135m-instruct)": "smollm2-135m-instruct",
    "byte-level BPE, qwen2 pre (qwen2.5-coder-0.5b-instruct)": "qwen2.5-coder-0.5b-instruct",
}
DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
TARGET_SECONDS = 2.0


def sample_text(path: Path, megabytes: float) -> str:
    source = path.read_text(encoding="utf-8")
    size = int(megabytes * 1_000_000)
    return (source * (size // len(source) + 1))[:size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=1.0)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    args = parser.parse_args()
    text = sample_text(args.text, args.megabytes)
    megabytes = len(text.encode()) / 1e6
    print(f"text: {args.text} repeated to {megabytes:.2f} MB")
    for label, name in MODELS.items():
        start = time.perf_counter()
        with open_gguf(ensure_model(name)) as g:
            tokenizer = Tokenizer.from_gguf(g)
        load = time.perf_counter() - start

        start = time.perf_counter()
        ids = tokenizer.encode(text, add_special=False)
        encode = time.perf_counter() - start

        start = time.perf_counter()
        decoded = tokenizer.decode(ids)
        decode = time.perf_counter() - start

        verdict = "ok" if encode < TARGET_SECONDS else f"SLOWER than {TARGET_SECONDS} s target"
        print(
            f"{label}: load {load:.2f} s | encode {encode:.2f} s, {megabytes / encode:.2f} MB/s, "
            f"{len(ids)} tokens ({verdict}) | decode {decode:.2f} s, {megabytes / decode:.2f} MB/s, "
            f"round trip {'exact' if decoded == text else 'DIFFERS'}"
        )


if __name__ == "__main__":
    main()
