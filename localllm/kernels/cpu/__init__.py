"""CPU kernels (Numba): quantized products, transformer ops, attention, thread control."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from localllm.kernels.cpu.attention import attention
from localllm.kernels.cpu.ops import geglu, rms_norm, rope, softmax, swiglu, warm_up_ops
from localllm.kernels.cpu.products import KERNELS, CheckedWeight, embed, matmul, matvec
from localllm.kernels.cpu.threads import get_threads, set_threads

__all__ = [
    "KERNELS",
    "CheckedWeight",
    "attention",
    "embed",
    "geglu",
    "get_threads",
    "matmul",
    "matvec",
    "rms_norm",
    "rope",
    "set_threads",
    "softmax",
    "swiglu",
    "warm_up",
]


class _TinyWeight:
    """Two zero rows of one block: enough to give every kernel its runtime signature."""

    def __init__(self, qtype: GGMLQuantizationType):
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        self.type = qtype
        self.name = f"warm-up {qtype.name}"
        self.raw = np.zeros((2, type_size), dtype=np.uint8)
        self.shape = (2, block_size)


def warm_up(types: Iterable[GGMLQuantizationType] | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> None:
    """Compile, or load from Numba's on-disk cache, the product kernels of `types` (default:
    every supported format) and the transformer ops.

    `progress(label, done, total)` is called before each step; a cold cache takes tens of
    seconds, a warm one about a second.
    """
    selected = list(KERNELS) if types is None else list(types)
    total = len(selected) + 1
    for done, qtype in enumerate(selected):
        if progress is not None:
            progress(f"{qtype.name} kernels", done, total)
        weight = _TinyWeight(qtype)
        cols = weight.shape[1]
        matvec(weight, np.zeros(cols, dtype=np.float32))
        matmul(weight, np.zeros((2, cols), dtype=np.float32))
        embed(weight, np.zeros(1, dtype=np.int64))
    if progress is not None:
        progress("transformer ops", total - 1, total)
    warm_up_ops()
