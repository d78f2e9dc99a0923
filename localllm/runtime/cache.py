"""The key/value cache: per-layer float32 keys and values, one slot per processed token.

Logical entries are the tokens processed so far, in order; every entry carries its own
position (the RoPE position its key was rotated with), so entries can later be dropped or
renumbered without the attention kernel assuming slot i sits at position i.

Layers with a sliding window only ever look back `window - 1` positions, so they keep a
trimmed buffer: when it fills up, the oldest entries nobody can see any more are shifted out.
A margin of `max_rollback` extra entries is kept so `truncate` (speculative decoding
rejecting draft tokens) can still re-feed from an earlier length.
"""

from __future__ import annotations

import numpy as np

from localllm.errors import ContextOverflowError, InvalidParameterError

POSITION_DTYPE = np.int32


class KVCache:
    def __init__(
        self,
        *,
        n_layer: int,
        n_head_kv: int,
        head_dim_k: int,
        head_dim_v: int,
        n_ctx: int,
        windows: list[int],
        max_append: int,
        max_rollback: int,
    ):
        if n_ctx <= 0:
            raise InvalidParameterError(f"context size must be positive, got {n_ctx}")
        if len(windows) != n_layer:
            raise InvalidParameterError(f"{len(windows)} window sizes given for {n_layer} layers")
        self.n_ctx = n_ctx
        self.n_layer = n_layer
        self.windows = list(windows)
        self.max_append = max_append
        self.max_rollback = max_rollback
        # Position of every logical entry; a layer holding entries [dropped, n_tokens) reads
        # its key positions as one contiguous slice of this array.
        self.positions = np.zeros(n_ctx, dtype=POSITION_DTYPE)
        self.n_tokens = 0
        self._pending = 0
        self._keep = []
        self._dropped = [0] * n_layer
        self.keys = []
        self.values = []
        for window in self.windows:
            if window > 0:
                keep = window - 1 + max_rollback
                capacity = min(n_ctx, keep + max(max_append, window))
            else:
                keep = n_ctx
                capacity = n_ctx
            self._keep.append(keep)
            # np.zeros maps pages lazily, so a large n_ctx costs memory only once it is used.
            self.keys.append(np.zeros((capacity, n_head_kv, head_dim_k), dtype=np.float32))
            self.values.append(np.zeros((capacity, n_head_kv, head_dim_v), dtype=np.float32))

    @property
    def next_position(self) -> int:
        return int(self.positions[self.n_tokens - 1]) + 1 if self.n_tokens else 0

    def check_room(self, n: int) -> None:
        if self.n_tokens + n > self.n_ctx:
            raise ContextOverflowError(
                f"{self.n_tokens} cached + {n} new tokens exceed the context size of {self.n_ctx}"
            )

    def append(self, n: int) -> np.ndarray:
        """Open n new entries at the next positions; returns their positions.

        Every layer must then `write` its keys and values for these n entries.
        """
        if not 0 < n <= self.max_append:
            raise InvalidParameterError(f"can append 1 to {self.max_append} entries at once, got {n}")
        self.check_room(n)
        start = self.next_position
        new = slice(self.n_tokens, self.n_tokens + n)
        self.positions[new] = np.arange(start, start + n, dtype=POSITION_DTYPE)
        for layer in range(self.n_layer):
            if self.n_tokens - self._dropped[layer] + n > self.keys[layer].shape[0]:
                self._shift_out(layer)
        self.n_tokens += n
        self._pending = n
        return self.positions[new]

    def write(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store the keys (n, kv_heads, head_dim_k) and values of the entries opened by `append`."""
        n = self._pending
        if k.shape[0] != n or v.shape[0] != n:
            raise InvalidParameterError(f"layer {layer}: expected {n} new keys/values, got {k.shape[0]}/{v.shape[0]}")
        end = self.n_tokens - self._dropped[layer]
        self.keys[layer][end - n : end] = k
        self.values[layer][end - n : end] = v

    def view(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys, values and key positions of every entry the layer still holds (no copies)."""
        dropped = self._dropped[layer]
        held = self.n_tokens - dropped
        return self.keys[layer][:held], self.values[layer][:held], self.positions[dropped : self.n_tokens]

    def truncate(self, length: int) -> None:
        """Forget every entry from `length` on, as if they had never been appended."""
        if not 0 <= length <= self.n_tokens:
            raise InvalidParameterError(f"cannot truncate a cache of {self.n_tokens} entries to {length}")
        for layer, window in enumerate(self.windows):
            if window > 0 and self._dropped[layer] > max(0, length - (window - 1)):
                raise InvalidParameterError(
                    f"cannot roll back to {length} entries: layer {layer} has already discarded "
                    f"entries before {self._dropped[layer]} (rollback margin is {self.max_rollback})"
                )
        self.n_tokens = length
        self._pending = 0

    def clear(self) -> None:
        self.n_tokens = 0
        self._pending = 0
        self._dropped = [0] * self.n_layer

    def _shift_out(self, layer: int) -> None:
        keep = self._keep[layer]
        dropped = self._dropped[layer]
        first_kept = max(dropped, self.n_tokens - keep)
        held = self.n_tokens - first_kept
        offset = first_kept - dropped
        self.keys[layer][:held] = self.keys[layer][offset : offset + held]
        self.values[layer][:held] = self.values[layer][offset : offset + held]
        self._dropped[layer] = first_kept
