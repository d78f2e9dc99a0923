"""The key/value cache and its policies: what to keep when a conversation outgrows it.

Logical entries are the tokens processed so far, in order; entry t holds the key and value of
the t-th token, its key rotated for position t. Each layer keeps its entries in a buffer of its
own, with the position of every slot beside it, so the attention kernel never assumes slot i
sits at position i.

Two policies (`CacheSpec.policy`):

- `full` (`FullCache`): room for `n_ctx` entries; one more is a ContextOverflowError, and a
  generation that reaches the end stops with reason `length`.
- `sink` (`SinkCache`): StreamingLLM (Xiao et al., 2023). Every layer that attends globally
  keeps the first `sinks` entries and the latest `window` (the current token included), so
  there is always room. Positions are those inside the cache: sinks at 0..S-1, the window
  after them, the query last. RoPE scores depend only on the distance between query and key,
  and within the window that distance is the same in the cache as in the text, so window keys
  stay rotated for their text position and only the sinks need another distance: the model
  rotates a second copy of the queries for their in-cache position (at most S + W - 1) and the
  kernel scores the sink slots with it (`sink_query_positions`). Decision by measurement
  (smollm2-135m, window 1024, two threads of a loaded 2-core EPYC): rotating every held key at
  attention time (the paper's way) is a RoPE over 1,028 keys per layer per token, 7.2 ms a
  token next to a 17 ms decode step, and needs a float32 copy of the f16 keys; llama.cpp's
  K-shift re-rotates the whole window at every batch eviction and rounds each kept f16 key
  again each time, so old keys drift; the second query rotation is 0.12 ms a token over all
  layers, and keys are written once and never rewritten.

Layers with a sliding window of their own (Gemma 3's local layers) keep that window under
either policy. Windowed buffers shift out the entries no query can see any more when they fill
up, keeping a margin of `max_rollback` entries so `truncate` (speculative decoding rejecting
draft tokens) can still roll back that far.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from numbers import Integral
from typing import NamedTuple

import numpy as np

from localllm.errors import ContextOverflowError, InvalidParameterError, OutOfMemoryError
from localllm.runtime.device import CPU, Device

POSITION_DTYPE = np.int32
POLICIES = ("full", "sink")
KV_DTYPES = {"f16": np.dtype(np.float16), "f32": np.dtype(np.float32)}


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise InvalidParameterError(f"{name} must be an int of at least {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class CacheSpec:
    """What cache a context gets: the policy, its sizes and the storage type of keys/values.

    `n_ctx` bounds the `full` policy; `sinks` and `window` size the `sink` policy, whose cache
    holds `sinks + window` entries however long the text.
    """

    policy: str = "full"
    n_ctx: int = 4096
    sinks: int = 4
    window: int = 1024
    kv_dtype: str = "f16"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise InvalidParameterError(f"cache policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise InvalidParameterError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        _check_int("n_ctx", self.n_ctx, 1)
        _check_int("window", self.window, 1)
        _check_int("sinks", self.sinks, 0)
        if self.sinks >= self.window:
            raise InvalidParameterError(f"sinks ({self.sinks}) must be smaller than window ({self.window})")

    @property
    def size(self) -> int:
        """The most entries a query attends to: n_ctx, or sinks + window."""
        return self.n_ctx if self.policy == "full" else self.sinks + self.window

    def describe(self) -> dict:
        fields = {"policy": self.policy, "kv_dtype": self.kv_dtype}
        if self.policy == "full":
            fields["n_ctx"] = self.n_ctx
        else:
            fields.update(sinks=self.sinks, window=self.window)
        return fields


@dataclass(frozen=True)
class CacheLayout:
    """The shape a model gives its cache: per-layer sizes and sliding windows (0: global)."""

    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    windows: tuple[int, ...]
    max_append: int
    max_rollback: int

    def bytes_per_token(self, kv_dtype: str) -> int:
        """Bytes of keys and values one entry costs across all layers."""
        itemsize = KV_DTYPES[kv_dtype].itemsize
        return self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * itemsize

    def capacities(self, spec: CacheSpec) -> list[int]:
        """Slots each layer's buffer has under `spec`."""
        return [_layer_plan(self, spec, window)[2] for window in self.windows]

    def total_bytes(self, spec: CacheSpec) -> int:
        """Memory the cache takes once every slot has been written."""
        per_slot = self.bytes_per_token(spec.kv_dtype) // self.n_layer + POSITION_DTYPE().itemsize
        return per_slot * sum(self.capacities(spec))


def _layer_plan(layout: CacheLayout, spec: CacheSpec, model_window: int) -> tuple[int, int, int]:
    """(sinks, window, capacity) of one layer: its own sliding window if the model gives it one,
    else the policy's. A windowed buffer keeps the window - 1 entries before the next token plus
    the rollback margin, and shifts once it has appended as many again (or a block's worth)."""
    if model_window:
        sinks, window = 0, model_window
    elif spec.policy == "sink":
        sinks, window = spec.sinks, spec.window
    else:
        return 0, 0, spec.n_ctx
    keep = window - 1 + layout.max_rollback
    capacity = sinks + keep + max(layout.max_append, window)
    if spec.policy == "full":
        capacity = min(capacity, spec.n_ctx)
    return sinks, window, capacity


def available_memory() -> int:
    """Bytes the kernel says can still be allocated without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class LayerView(NamedTuple):
    """What attention reads for one layer: the held slots (no copies) and how to mask them."""

    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray
    window: int  # 0: no window
    n_sink: int  # the first n_sink slots are sinks, scored with the in-cache query positions


class KVCache:
    """Per-layer key/value buffers; the policy subclasses decide when there is room.

    The buffers (keys, values and their positions) are arrays of `device`: numpy, or torch
    tensors on the GPU; what decides where entries go is numpy on both."""

    def __init__(self, layout: CacheLayout, spec: CacheSpec, device: Device = CPU):
        if len(layout.windows) != layout.n_layer:
            raise InvalidParameterError(f"{len(layout.windows)} window sizes given for {layout.n_layer} layers")
        self.layout = layout
        self.spec = spec
        self.device = device
        self.n_layer = layout.n_layer
        self.max_append = layout.max_append
        self.max_rollback = layout.max_rollback
        plans = [_layer_plan(layout, spec, window) for window in layout.windows]
        needed = layout.total_bytes(spec)
        available = device.free_memory()
        if available is None:
            available = available_memory()
        # np.zeros maps pages lazily, so an oversized cache would only fail (or swap) mid-way
        # through a long context: refuse it before anything is allocated.
        if needed > available:
            raise OutOfMemoryError(
                f"the KV cache ({_describe(spec)}) needs {needed:,} bytes but only {available:,} "
                "are available; lower n_ctx or use the sink policy"
            )
        self._sinks = [plan[0] for plan in plans]
        self._windows = [plan[1] for plan in plans]
        # Layers that follow the sink policy rather than a sliding window of the model's own.
        self._streaming = [spec.policy == "sink" and not window for window in layout.windows]
        dtype = KV_DTYPES[spec.kv_dtype]
        self.keys = [device.zeros((plan[2], layout.n_head_kv, layout.head_dim_k), dtype) for plan in plans]
        self.values = [device.zeros((plan[2], layout.n_head_kv, layout.head_dim_v), dtype) for plan in plans]
        self.positions = [device.zeros((plan[2],), POSITION_DTYPE) for plan in plans]
        self.n_tokens = 0
        self._pending = 0
        # First text position held past each layer's sinks; entries before it were shifted out.
        self._dropped = list(self._sinks)
        # Set while the current block reaches past sinks + window: the streaming layers then
        # mask with their window and score their sinks with the in-cache query positions.
        self._sink_query_positions: np.ndarray | None = None

    @property
    def next_position(self) -> int:
        return self.n_tokens

    @property
    def in_use(self) -> int:
        """Entries attention sees (at most `spec.size`); the buffers hold a few more, for the
        rollback margin, until they shift them out."""
        return min(self.n_tokens, self.spec.size)

    @property
    def evicted(self) -> int:
        """Entries the sink policy has let go of so far."""
        return self.n_tokens - self.in_use

    def has_room(self, n: int) -> bool:
        raise NotImplementedError

    def check_room(self, n: int) -> None:
        if not self.has_room(n):
            raise ContextOverflowError(
                f"{self.n_tokens} cached + {n} new tokens exceed the context size of {self.spec.n_ctx}"
            )

    def held(self, layer: int) -> int:
        return self.n_tokens - self._dropped[layer] + self._sinks[layer]

    def append(self, n: int) -> np.ndarray:
        """Open n new entries at the next positions; returns their positions.

        Every layer must then `write` its keys and values for these n entries.
        """
        if not 0 < n <= self.max_append:
            raise InvalidParameterError(f"can append 1 to {self.max_append} entries at once, got {n}")
        self.check_room(n)
        positions = np.arange(self.n_tokens, self.n_tokens + n, dtype=POSITION_DTYPE)
        stored = self.device.asarray(positions)
        for layer in range(self.n_layer):
            held = self.held(layer)
            if held + n > self.keys[layer].shape[0]:
                self._shift_out(layer)
                held = self.held(layer)
            self.positions[layer][held : held + n] = stored
        self.n_tokens += n
        self._pending = n
        sink_positions = self._sink_positions_for(positions)
        self._sink_query_positions = None if sink_positions is None else self.device.asarray(sink_positions)
        return positions

    def write(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store the keys (n, kv_heads, head_dim_k) and values of the entries opened by `append`."""
        n = self._pending
        if k.shape[0] != n or v.shape[0] != n:
            raise InvalidParameterError(f"layer {layer}: expected {n} new keys/values, got {k.shape[0]}/{v.shape[0]}")
        end = self.held(layer)
        self.keys[layer][end - n : end] = k
        self.values[layer][end - n : end] = v

    def view(self, layer: int) -> LayerView:
        """Keys, values and key positions of every entry the layer holds, and its mask."""
        held = self.held(layer)
        window, n_sink = self._windows[layer], 0
        if self._streaming[layer]:
            # Until the first eviction the streaming cache is a plain causal one, computed
            # exactly as the full policy computes it.
            if self._sink_query_positions is None:
                window = 0
            else:
                n_sink = self._sinks[layer]
        keys, values, positions = self.keys[layer][:held], self.values[layer][:held], self.positions[layer][:held]
        return LayerView(keys, values, positions, window, n_sink)

    def sink_query_positions(self, layer: int) -> np.ndarray | None:
        """In-cache positions of the current block's queries (an array of the device), for
        scoring the layer's sinks; None while they equal the text positions."""
        return self._sink_query_positions if self._streaming[layer] and self._sinks[layer] else None

    def _sink_positions_for(self, positions: np.ndarray) -> np.ndarray | None:
        return None

    def truncate(self, length: int) -> None:
        """Forget every entry from `length` on, as if they had never been appended."""
        if not 0 <= length <= self.n_tokens:
            raise InvalidParameterError(f"cannot truncate a cache of {self.n_tokens} entries to {length}")
        for layer, window in enumerate(self._windows):
            if window and self._dropped[layer] > max(self._sinks[layer], length - (window - 1)):
                raise InvalidParameterError(
                    f"cannot roll back to {length} entries: layer {layer} has already discarded "
                    f"entries before {self._dropped[layer]} (rollback margin is {self.max_rollback})"
                )
        self.n_tokens = length
        self._pending = 0
        self._sink_query_positions = None

    def clear(self) -> None:
        self.n_tokens = 0
        self._pending = 0
        self._dropped = list(self._sinks)
        self._sink_query_positions = None

    def state(self) -> dict:
        """Everything besides the buffers that `restore` needs (for saving a session)."""
        return {"n_tokens": self.n_tokens, "dropped": list(self._dropped)}

    def held_arrays(self):
        """(layer, keys, values, positions) of the held slots of every layer as numpy arrays:
        views without copies on the CPU, copies from the GPU."""
        numpy = self.device.numpy
        for layer in range(self.n_layer):
            held = self.held(layer)
            yield (
                layer,
                numpy(self.keys[layer][:held]),
                numpy(self.values[layer][:held]),
                numpy(self.positions[layer][:held]),
            )

    def restore(self, state: dict, arrays: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Replace the contents by a saved `state` and its per-layer (keys, values, positions),
        numpy arrays."""
        n_tokens, dropped = state["n_tokens"], state["dropped"]
        if len(dropped) != self.n_layer or len(arrays) != self.n_layer:
            raise InvalidParameterError(f"saved cache has {len(dropped)} layers, this model {self.n_layer}")
        for layer, (keys, values, positions) in enumerate(arrays):
            held = n_tokens - dropped[layer] + self._sinks[layer]
            if not (
                self._sinks[layer] <= dropped[layer] <= max(n_tokens, self._sinks[layer])
                and keys.shape == (held,) + self.keys[layer].shape[1:]
                and values.shape == (held,) + self.values[layer].shape[1:]
                and positions.shape == (held,)
                and held <= self.keys[layer].shape[0]
            ):
                raise InvalidParameterError(f"saved cache does not fit layer {layer} of this cache")
        if not self.has_room_for_total(n_tokens):
            raise ContextOverflowError(f"saved cache holds {n_tokens} entries, more than n_ctx {self.spec.n_ctx}")
        for layer, (keys, values, positions) in enumerate(arrays):
            held = keys.shape[0]
            self.keys[layer][:held] = self.device.asarray(keys)
            self.values[layer][:held] = self.device.asarray(values)
            self.positions[layer][:held] = self.device.asarray(positions)
        self.n_tokens = n_tokens
        self._dropped = list(dropped)
        self._pending = 0
        self._sink_query_positions = None

    def has_room_for_total(self, n_tokens: int) -> bool:
        return True

    def _shift_out(self, layer: int) -> None:
        sinks = self._sinks[layer]
        keep = self._windows[layer] - 1 + self.max_rollback
        dropped = self._dropped[layer]
        first_kept = max(dropped, self.n_tokens - keep)
        kept = self.n_tokens - first_kept
        source = sinks + first_kept - dropped
        for buffer in (self.keys[layer], self.values[layer], self.positions[layer]):
            self.device.move(buffer, sinks, source, kept)
        self._dropped[layer] = first_kept


class FullCache(KVCache):
    """Room for n_ctx entries, then a ContextOverflowError."""

    def has_room(self, n: int) -> bool:
        return self.n_tokens + n <= self.spec.n_ctx

    def has_room_for_total(self, n_tokens: int) -> bool:
        return n_tokens <= self.spec.n_ctx


class SinkCache(KVCache):
    """StreamingLLM: sinks plus a sliding window; always room (see the module docstring)."""

    def has_room(self, n: int) -> bool:
        return True

    def _sink_positions_for(self, positions: np.ndarray) -> np.ndarray | None:
        last_slot = self.spec.sinks + self.spec.window - 1
        if positions[-1] <= last_slot:
            return None
        return np.minimum(positions, last_slot).astype(POSITION_DTYPE)


def _describe(spec: CacheSpec) -> str:
    return ", ".join(f"{key}={value}" for key, value in spec.describe().items())


def new_cache(layout: CacheLayout, spec: CacheSpec, device: Device = CPU) -> KVCache:
    return (FullCache if spec.policy == "full" else SinkCache)(layout, spec, device)
