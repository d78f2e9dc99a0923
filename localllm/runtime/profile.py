"""Per-op wall-clock timers for a forward pass, for `localllm bench -v`.

The architectures call kernels through the `localllm.kernels.cpu` module, so while an
`OpTimers` block is active that module's ops are swapped for timed wrappers; products are
labelled by the weight's role (`attn_q`, `ffn_down`, `output`, ...). Whatever wall time the
ops do not account for is Python and NumPy glue in the model and engine, reported as `other`.
The swap is process-wide: profile only while nothing else runs a model.
"""

from __future__ import annotations

import time
from collections import defaultdict

from localllm.kernels import cpu as kernels

_PRODUCTS = ("matvec", "matmul")
_OPS = ("attention", "rms_norm", "rope", "swiglu", "geglu", "embed", "softmax")


def _role(weight) -> str:
    """`blk.3.attn_q.weight` -> `attn_q`; `output.weight` -> `output`."""
    parts = getattr(weight, "name", "weight").split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


class OpTimers:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.wall_seconds = 0.0
        self._originals: dict[str, object] = {}
        self._started = 0.0

    def _wrap(self, name: str, function, labelled: bool):
        seconds, calls = self.seconds, self.calls

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                label = f"{name} {_role(args[0])}" if labelled else name
                seconds[label] += time.perf_counter() - started
                calls[label] += 1

        return timed

    def __enter__(self) -> OpTimers:
        for name in _PRODUCTS + _OPS:
            original = getattr(kernels, name)
            self._originals[name] = original
            setattr(kernels, name, self._wrap(name, original, labelled=name in _PRODUCTS + ("embed",)))
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.wall_seconds += time.perf_counter() - self._started
        for name, original in self._originals.items():
            setattr(kernels, name, original)
        self._originals.clear()

    def per_token(self, n_tokens: int) -> dict[str, float]:
        """Seconds per token for each op, largest first, plus `other` (time outside every op)."""
        table = dict(sorted(self.seconds.items(), key=lambda item: -item[1]))
        table["other"] = max(0.0, self.wall_seconds - sum(self.seconds.values()))
        return {label: value / max(1, n_tokens) for label, value in table.items()}
