"""Compiling the CPU kernels ahead of use, or loading them from Numba's on-disk cache, so that no
product waits on a compile."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from localllm.formats.quants import LAYOUTS
from localllm.kernels.cpu.activations import warm_up_rows
from localllm.kernels.cpu.ops import warm_up_ops
from localllm.kernels.cpu.products import INTEGER_PRODUCTS, KERNELS, embed, matmul, matvec

# A warm_up whose activation-rounding step takes longer than this is compiling, not loading.
_COLD_CACHE_SECONDS = 0.3


class _TinyWeight:
    """Two zero rows of one block: enough to give every kernel its runtime signature (read-only
    bytes, as a model's weights are views of a read-only map; writable ones compile apart)."""

    def __init__(self, qtype: GGMLQuantizationType):
        block_size, type_size = LAYOUTS[qtype].block_size, LAYOUTS[qtype].type_size
        self.type = qtype
        self.name = f"warm-up {qtype.name}"
        self.raw = np.zeros((2, type_size), dtype=np.uint8)
        self.raw.flags.writeable = False
        self.shape = (2, block_size)


def _warm_products(qtype: GGMLQuantizationType) -> None:
    weight = _TinyWeight(qtype)
    cols = weight.shape[1]
    matvec(weight, np.zeros(cols, dtype=np.float32))
    matmul(weight, np.zeros((2, cols), dtype=np.float32))


def _warm_embed(qtype: GGMLQuantizationType) -> None:
    embed(_TinyWeight(qtype), np.zeros(1, dtype=np.int64))


def warm_float_kernels(type_names: list[str], with_ops: bool = False) -> None:
    """The second process of a parallel warm_up: the float kernels (floats.py, legacy.py,
    kquants.py) of the named types, i.e. their embedding lookups and, where there is no
    integer kernel, their products, then (`with_ops`) the transformer ops. The first process
    compiles none of these, so the two never write entries of the same function to Numba's
    cache."""
    for name in type_names:
        qtype = GGMLQuantizationType[name]
        _warm_embed(qtype)
        if qtype not in INTEGER_PRODUCTS:
            _warm_products(qtype)
    if with_ops:
        warm_up_ops()


def _start_float_worker(types: list[GGMLQuantizationType]) -> subprocess.Popen:
    package_root = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    script = (
        "import sys; from localllm.kernels.cpu.warmup import warm_float_kernels; "
        "warm_float_kernels(sys.argv[1:], with_ops=True)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, *(qtype.name for qtype in types)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def warm_up(
    types: Iterable[GGMLQuantizationType] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    processes: int | None = None,
) -> None:
    """Compile, or load from Numba's on-disk cache, the product and embedding kernels of `types`
    (default: every supported format) and the transformer ops.

    `progress(label, done, total)` is called before each step; a cold cache takes tens of
    seconds, a warm one about a second. With `processes` > 1 (default: 2 where there are two
    cores) and a cold cache, a second Python process compiles the float kernels and the ops
    (warm_float_kernels) into the shared cache while this one compiles the integer products;
    this process then loads what the other compiled (and compiles whatever it could not).
    """
    selected = list(KERNELS) if types is None else list(types)
    if processes is None:
        processes = min(2, os.cpu_count() or 1)
    if processes == 1:
        steps = [(f"{qtype.name} kernels", partial(_warm_type, qtype)) for qtype in selected]
        steps.append(("transformer ops", warm_up_ops))
        _run_steps(steps, progress, 0)
        return
    here = [qtype for qtype in selected if qtype in INTEGER_PRODUCTS]
    total = len(here) + 3
    if progress is not None:
        progress("activation rounding", 0, total)
    started = time.perf_counter()
    warm_up_rows()
    # Loaded from the cache in a blink: the rest most likely is cached too, and a second
    # process would only cost its start-up.
    worker = _start_float_worker(selected) if time.perf_counter() - started > _COLD_CACHE_SECONDS else None
    steps = [(f"{qtype.name} kernels", partial(_warm_products, qtype)) for qtype in here]
    if worker is None:
        steps.append(("other kernels and ops", partial(warm_float_kernels, [qtype.name for qtype in selected], True)))
    else:
        steps.append(("other kernels and ops (second process)", worker.wait))
    steps.append(("loading kernels", partial(warm_up, selected, None, 1)))
    _run_steps(steps, progress, 1)


def _run_steps(steps, progress, first: int) -> None:
    total = first + len(steps)
    for done, (label, step) in enumerate(steps, start=first):
        if progress is not None:
            progress(label, done, total)
        step()


def _warm_type(qtype: GGMLQuantizationType) -> None:
    _warm_products(qtype)
    _warm_embed(qtype)
