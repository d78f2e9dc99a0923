"""`LLM`: one loaded model with its tokenizer and KV cache."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from localllm.errors import InvalidParameterError
from localllm.formats.gguf import open_gguf
from localllm.formats.tokenizer import Tokenizer
from localllm.kernels import cpu as kernels
from localllm.runtime.catalog import ensure_model
from localllm.runtime.models import load_model

# The context allocated when the caller does not ask for one: enough for chat, and the
# training context of small models would otherwise reserve (lazily) a very large cache.
DEFAULT_N_CTX = 4096


class LLM:
    """A model loaded from a GGUF file (path or catalog name, pulled if missing).

    Attributes: `path`, `gguf` (the open file), `model` (its architecture, weights in the
    memory map), `tokenizer`, `cache` (the KV cache of the current context) and `n_ctx`.
    """

    def __init__(self, model: str | os.PathLike, n_ctx: int | None = None, threads: int | None = None):
        self.path = ensure_model(model)
        if threads is not None:
            kernels.set_threads(threads)
        self.gguf = open_gguf(self.path)
        try:
            self.model = load_model(self.gguf, self.path)
            self.tokenizer = Tokenizer.from_gguf(self.gguf)
            if n_ctx is None:
                n_ctx = min(self.model.hparams.n_ctx_train, DEFAULT_N_CTX)
            if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx <= 0:
                raise InvalidParameterError(f"n_ctx must be a positive int, got {n_ctx!r}")
            self.n_ctx = n_ctx
            self.cache = self.model.new_cache(n_ctx)
        except BaseException:
            self.gguf.close()
            raise

    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab

    def tokenize(self, text: str, special: bool = False, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; add_bos adds the BOS token when the model uses one, special
        parses control-token text such as <|im_start|> as those tokens."""
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def reset(self) -> None:
        """Empty the KV cache: the next forward pass starts a fresh context."""
        self.cache.clear()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits (len(ids), n_vocab) of every position of `ids` on a fresh context."""
        self.reset()
        return self.model.forward(ids, self.cache, all_logits=True)

    def close(self) -> None:
        self.gguf.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
