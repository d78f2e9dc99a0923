"""Where a model runs: "cpu" (numpy arrays, the Numba kernels of localllm.kernels.cpu) or "cuda"
(torch tensors on one device, the Triton kernels of localllm.kernels.gpu).

The architecture files are the same for both: a model calls the kernels module of its device
and the handful of array operations below, which are all the two array libraries differ in
for the runtime. Positions and cache bookkeeping stay numpy on both; logits come back as numpy.

torch and triton are an optional extra (`pip install -e '.[gpu]'`), imported only when "cuda"
is asked for. Without a CUDA device, setting TRITON_INTERPRET=1 (before triton is imported)
runs the Triton kernels through Triton's interpreter on CPU tensors: that is how the tests
exercise the GPU path on a machine without one (slowly: a small model's forward takes minutes).
Otherwise "cuda" without a usable device is a DeviceError that names why.
"""

from __future__ import annotations

import importlib
import os
from functools import cache

import numpy as np

from localllm.errors import DeviceError, InvalidParameterError

DEVICES = ("cpu", "cuda")


class Device:
    """numpy arrays in host memory, computed on by the CPU kernels."""

    name = "cpu"

    @property
    def kernels(self):
        from localllm.kernels import cpu

        return cpu

    def asarray(self, a: np.ndarray):
        """`a` (numpy) as an array of this device: the same array here."""
        return a

    def numpy(self, x) -> np.ndarray:
        """`x` as a numpy array in host memory: `x` itself here."""
        return x

    def clone(self, x):
        return x.copy()

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype):
        return np.zeros(shape, dtype=dtype)

    def move(self, buffer, start: int, source: int, count: int) -> None:
        """buffer[start : start + count] = buffer[source : source + count], the ranges may overlap."""
        buffer[start : start + count] = buffer[source : source + count]

    def free_memory(self) -> int | None:
        """Bytes that can still be allocated on the device; None: host memory (the caller's measure)."""
        return None


class TorchDevice(Device):
    """torch tensors on `target` ("cuda", or "cpu" under the Triton interpreter)."""

    def __init__(self, torch, target: str):
        self._torch = torch
        self.target = torch.device(target)
        self.name = "cuda"

    @property
    def kernels(self):
        from localllm.kernels import gpu

        return gpu

    def asarray(self, a: np.ndarray):
        # A copy: torch would share a read-only numpy array's memory (a session file's map) and
        # warn that it cannot protect it.
        return self._torch.tensor(a, device=self.target)

    def numpy(self, x) -> np.ndarray:
        return x.cpu().numpy()

    def clone(self, x):
        return x.clone()

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype):
        return self._torch.zeros(shape, dtype=getattr(self._torch, np.dtype(dtype).name), device=self.target)

    def move(self, buffer, start: int, source: int, count: int) -> None:
        # torch refuses a copy between overlapping ranges of one tensor.
        buffer[start : start + count] = buffer[source : source + count].clone()

    def free_memory(self) -> int | None:
        if self.target.type != "cuda":
            return None
        return int(self._torch.cuda.mem_get_info(self.target)[0])


CPU = Device()


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def get_device(name: str) -> Device:
    """The Device called `name` ("cpu" or "cuda"), or a one-line DeviceError saying why "cuda"
    cannot be used here."""
    if name not in DEVICES:
        raise InvalidParameterError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    return CPU if name == "cpu" else _cuda()


@cache
def _cuda() -> TorchDevice:
    torch = _import("torch")
    _import("triton")
    if torch.cuda.is_available():
        target = "cuda"
    elif interpreter_requested():
        target = "cpu"
    else:
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise DeviceError(
            f"cannot run on cuda: no CUDA device found ({build}); set TRITON_INTERPRET=1 to run "
            "the GPU kernels on the CPU through Triton's interpreter"
        )
    # Imported now so that a broken install is this one-line error, not a failure mid-forward.
    _import("localllm.kernels.gpu")
    return TorchDevice(torch, target)


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise DeviceError(
            f"cannot run on cuda: {module} cannot be imported ({error}); install the GPU extra "
            "(pip install 'localllm[gpu]')"
        ) from None
