"""What `localllm info` reports about a GGUF file: hyperparameters, tokenizer and tensor types."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from localllm.errors import LocalLLMError
from localllm.formats.gguf import open_gguf


def _plain(value: Any) -> Any:
    """A JSON-friendly version of a metadata value; per-layer arrays that are uniform collapse."""
    if isinstance(value, np.ndarray):
        if value.size and np.all(value == value.flat[0]):
            return value.flat[0].item()
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _kv_cache(metadata: dict, spec) -> dict[str, Any]:
    """KV-cache memory per token for each storage type and, for `spec` (a CacheSpec), in total;
    None values for an architecture we cannot run."""
    from localllm.runtime.cache import KV_DTYPES
    from localllm.runtime.models import cache_layout

    try:
        layout = cache_layout(metadata)
    except LocalLLMError:
        return {"kv_cache_bytes_per_token": None, "kv_cache_bytes_per_token_by_type": None, "kv_cache": None}
    by_type = {dtype: layout.bytes_per_token(dtype) for dtype in KV_DTYPES}
    total = None
    if spec is not None:
        # Every slot the buffers have: the window plus the rollback margin and a block of slack.
        total = {**spec.describe(), "bytes": layout.total_bytes(spec)}
    return {"kv_cache_bytes_per_token": by_type["f16"], "kv_cache_bytes_per_token_by_type": by_type, "kv_cache": total}


def model_info(path: Path, cache=None) -> dict[str, Any]:
    """Summarise the GGUF file at `path` as a JSON-serialisable dict; `cache` (a CacheSpec) adds
    what that cache costs in total."""
    with open_gguf(path) as g:
        meta = g.metadata
        arch = meta.get("general.architecture")

        def hparam(key: str) -> Any:
            return _plain(meta.get(f"{arch}.{key}"))

        embedding_length = hparam("embedding_length")
        head_count = hparam("attention.head_count")
        head_count_kv = hparam("attention.head_count_kv")
        if head_count_kv is None:
            head_count_kv = head_count
        head_dim = hparam("attention.key_length")
        if head_dim is None and isinstance(embedding_length, int) and isinstance(head_count, int):
            head_dim = embedding_length // head_count if head_count else None
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens) if tokens is not None else hparam("vocab_size")

        tensor_types: dict[str, dict[str, int]] = {}
        parameters = 0
        for tensor in g.tensors.values():
            parameters += math.prod(int(n) for n in tensor.ne)
            summary = tensor_types.setdefault(tensor.type.name, {"count": 0, "bytes": 0})
            summary["count"] += 1
            summary["bytes"] += int(tensor.nbytes)

        return {
            "path": str(path),
            **_kv_cache(meta, cache),
            "name": meta.get("general.name"),
            "architecture": arch,
            "parameters": parameters,
            "context_length": hparam("context_length"),
            "embedding_length": embedding_length,
            "block_count": hparam("block_count"),
            "head_count": head_count,
            "head_count_kv": head_count_kv,
            "head_dim": head_dim,
            "vocab_size": vocab_size,
            "tokenizer_model": meta.get("tokenizer.ggml.model"),
            "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
            "chat_template": "tokenizer.chat_template" in meta,
            "file_bytes": Path(path).stat().st_size,
            "tensor_count": len(g.tensors),
            "tensor_types": dict(sorted(tensor_types.items(), key=lambda item: item[1]["bytes"], reverse=True)),
        }


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def render_info(info: dict[str, Any], console) -> None:
    """Print `info` (from model_info) for people, with rich tables."""
    from rich.filesize import decimal
    from rich.table import Table

    def shown(value: Any) -> str:
        return "-" if value is None else str(value)

    overview = Table(show_header=False, box=None, pad_edge=False)
    overview.add_column(style="bold")
    overview.add_column(overflow="fold")
    rows = [
        ("path", info["path"]),
        ("name", shown(info["name"])),
        ("architecture", shown(info["architecture"])),
        ("parameters", f"{info['parameters']:,} ({_human_count(info['parameters'])})"),
        ("context length", shown(info["context_length"])),
        ("embedding length", shown(info["embedding_length"])),
        ("layers", shown(info["block_count"])),
        ("attention heads", shown(info["head_count"])),
        ("KV heads", shown(info["head_count_kv"])),
        ("head dim", shown(info["head_dim"])),
        ("vocabulary size", shown(info["vocab_size"])),
        ("tokenizer", f"{shown(info['tokenizer_model'])} (pre: {shown(info['tokenizer_pre'])})"),
        ("chat template", "yes" if info["chat_template"] else "no"),
        ("kind", info["kind"] or "not a catalog model (a chat template suggests instruct)"),
        (
            "KV cache per token",
            "-"
            if info["kv_cache_bytes_per_token_by_type"] is None
            else ", ".join(
                f"{size:,} bytes ({dtype})" for dtype, size in info["kv_cache_bytes_per_token_by_type"].items()
            ),
        ),
        ("file size", f"{decimal(info['file_bytes'])} ({info['file_bytes']:,} bytes)"),
    ]
    if info.get("kv_cache"):
        cache = dict(info["kv_cache"])
        total = cache.pop("bytes")
        settings = ", ".join(f"{key}={value}" for key, value in cache.items())
        rows.insert(-1, (f"KV cache ({settings})", f"{decimal(total)} ({total:,} bytes) when full"))
    for label, value in rows:
        overview.add_row(label, value)
    console.print(overview)

    types = Table(title=f"{info['tensor_count']} tensors")
    types.add_column("type")
    types.add_column("tensors", justify="right")
    types.add_column("bytes", justify="right")
    for name, summary in info["tensor_types"].items():
        types.add_row(name, str(summary["count"]), f"{summary['bytes']:,}")
    console.print(types)
