"""GPU kernels (Triton): quantized products straight from GGUF blocks, transformer ops, attention.

The same names and signatures as localllm.kernels.cpu, on torch tensors of one device (cuda, or
cpu under TRITON_INTERPRET=1). Weights are uploaded once as their raw GGUF bytes by
CheckedWeight; activations are float32 and stay float (`quantize=` is accepted and ignored).
Importing this module needs torch and triton and raises ImportError without them.
"""

from __future__ import annotations

from localllm.kernels.gpu.attention import attention
from localllm.kernels.gpu.ops import geglu, rms_norm, rope, softmax, swiglu
from localllm.kernels.gpu.products import SUPPORTED_TYPES, CheckedWeight, default_device, embed, matmul, matvec

__all__ = [
    "SUPPORTED_TYPES",
    "CheckedWeight",
    "attention",
    "default_device",
    "embed",
    "geglu",
    "matmul",
    "matvec",
    "rms_norm",
    "rope",
    "softmax",
    "swiglu",
]
