"""CPU kernels (Numba): quantized products, transformer ops, attention, thread control.

Compiling them ahead of use (warm_up) is in warmup.py.
"""

from localllm.kernels.cpu.attention import attention
from localllm.kernels.cpu.ops import geglu, rms_norm, rope, softmax, swiglu
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
]
