"""Architecture registry: general.architecture -> model class.

Every module in this package that defines `ARCHITECTURES = {name: ModelClass}` is picked up,
so supporting a new architecture means adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from localllm.errors import GGUFError, ModelError
from localllm.runtime.cache import CacheLayout
from localllm.runtime.device import CPU, Device
from localllm.runtime.models.base import DEFAULT_MAX_ROLLBACK, PREFILL_BLOCK, Model, read_hparams, source_name

__all__ = ["Model", "architectures", "cache_layout", "kv_bytes_per_token", "load_model"]


@cache
def architectures() -> dict[str, type[Model]]:
    found = {}
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        found.update(getattr(module, "ARCHITECTURES", {}))
    return found


def cache_layout(metadata: dict, source: str = "metadata") -> CacheLayout:
    """The KV cache layout of the model `metadata` describes, without loading its weights."""
    arch = metadata.get("general.architecture")
    model_class = architectures().get(arch)
    if model_class is None:
        raise ModelError(f"unsupported architecture {arch!r} in {source}")
    hp = read_hparams(metadata, source, n_vocab=0)
    return CacheLayout(
        n_layer=hp.n_layer,
        n_head_kv=hp.n_head_kv,
        head_dim_k=hp.head_dim_k,
        head_dim_v=hp.head_dim_v,
        windows=tuple(model_class.windows_for(metadata, hp.n_layer, source)),
        max_append=PREFILL_BLOCK,
        max_rollback=DEFAULT_MAX_ROLLBACK,
    )


def kv_bytes_per_token(metadata: dict, kv_dtype: str = "f16") -> int:
    """Bytes of KV cache stored as `kv_dtype` ("f16" or "f32") that one token costs across all
    layers of the model described by metadata."""
    return cache_layout(metadata).bytes_per_token(kv_dtype)


def load_model(gguf_file, path=None, device: Device = CPU) -> Model:
    """Build the model for an open GGUF file, to run on `device` (localllm.runtime.device); on
    the CPU its weights stay in the file's memory map."""
    source = source_name(path if path is not None else getattr(gguf_file, "path", None))
    arch = gguf_file.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"no general.architecture in {source}")
    model_class = architectures().get(arch)
    if model_class is None:
        supported = ", ".join(sorted(architectures()))
        raise ModelError(f"unsupported architecture {arch!r} in {source} (supported: {supported})")
    try:
        embedding = gguf_file.tensor("token_embd.weight")
    except (GGUFError, KeyError):
        raise ModelError(f"missing tensor token_embd.weight in {source}") from None
    return model_class(gguf_file, source, n_vocab=int(embedding.shape[0]), device=device)
