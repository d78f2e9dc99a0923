"""`LLM`: one loaded model with its tokenizer and KV cache."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from numbers import Integral
from pathlib import Path

import numpy as np

from localllm.errors import InvalidParameterError
from localllm.formats.chat import ChatTemplate
from localllm.formats.gguf import open_gguf
from localllm.formats.tokenizer import Tokenizer
from localllm.kernels import cpu as kernels
from localllm.kernels.cpu import warmup
from localllm.runtime.cache import CacheSpec
from localllm.runtime.catalog import ensure_model, entry_for_path
from localllm.runtime.device import CPU, get_device
from localllm.runtime.drafters.draft_model import DraftModelDrafter, load_draft_model
from localllm.runtime.drafters.prompt_lookup import PromptLookupDrafter
from localllm.runtime.engine import Completion, Generation, GenerationLock, GenerationRequest
from localllm.runtime.models import load_model
from localllm.runtime.speculative import DEFAULT_DRAFT_MAX, DraftLengthPolicy, Speculation, check_draft_max

# `draft` values that name no model: prompt lookup, and the catalog's choice for the model.
LOOKUP = "lookup"
AUTO = "auto"
# `session(draft=...)` left out: the session drafts as its LLM does.
SAME_AS_LLM = object()

# The context allocated when the caller does not ask for one: enough for chat, and the
# training context of small models would otherwise reserve (lazily) a very large cache.
DEFAULT_N_CTX = 4096


class LLM:
    """A model loaded from a GGUF file (path or catalog name, pulled if missing).

    Attributes: `path`, `gguf` (the open file), `model` (its architecture, weights in the
    memory map), `tokenizer`, `cache` (the KV cache of the current context), `cache_spec` and
    `n_ctx`. The cache follows `cache`: "full" (n_ctx entries, then the context is full) or
    "sink" (StreamingLLM: the first `sinks` entries plus the latest `window`, so generation
    never runs out of room); keys and values are stored as `kv_dtype` ("f16" or "f32"). A cache
    that would not fit in the available memory is refused (OutOfMemoryError) before anything
    is allocated. `quantize_activations=False` runs products on float32 activations instead of
    llama.cpp's 8-bit rounding of them. Loading also compiles, or loads from Numba's cache, every kernel
    the model needs (warmup.warm_up), so the first token never waits on a compile;
    `compile_progress(label, done, total)` follows its steps (a cold cache takes tens of
    seconds, on the first run on a machine).

    `device="cuda"` runs the same model on the GPU: weights copied there once, torch tensors
    and the Triton kernels (localllm.kernels.gpu), activations always in float (as
    `quantize_activations=False`), the KV cache in GPU memory; logits still come back as numpy.
    It needs the `gpu` extra (torch, triton) and a CUDA device, or TRITON_INTERPRET=1 to run the
    kernels through Triton's interpreter on the CPU (slow; for tests); otherwise it is a
    DeviceError saying which is missing. A draft model runs on the same device as this one.

    `draft` turns on speculative decoding (the same tokens when greedy, the same distribution
    when sampling; faster where the drafts are good, about as fast where they are not):
    "lookup" drafts by prompt lookup, a catalog name or GGUF path drafts with that model (its
    vocabulary must be this model's, else IncompatibleDraftError), "auto" with the catalog's
    draft model for this one, or prompt lookup when it names none. `draft_max` bounds the
    tokens drafted per round; the length is chosen each round by measurement
    (`draft_adaptive=False`: always `draft_max`, for reproducible seeded sampling).
    `draft_vocab` is the draft model's output head: "auto" scores only the tokens of the
    shipped frequent-token table of its vocabulary where there is one (FR-Spec: cheaper
    drafts, the same output), "full" every token, or a table's path
    (`localllm/runtime/drafters/frequent_tokens.py`).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        n_ctx: int | None = None,
        threads: int | str | None = None,
        quantize_activations: bool = True,
        compile_progress: Callable[[str, int, int], None] | None = None,
        *,
        cache: str = "full",
        sinks: int = 4,
        window: int = 1024,
        kv_dtype: str = "f16",
        draft: str | os.PathLike | None = None,
        draft_max: int = DEFAULT_DRAFT_MAX,
        draft_adaptive: bool = True,
        draft_vocab: str | os.PathLike = AUTO,
        device: str = "cpu",
    ):
        started = time.perf_counter()
        # Held for a whole generation (or logits call): they share the one KV cache.
        self._lock = GenerationLock()
        # Before the model is looked up or pulled: a missing GPU stack fails at once.
        self.device = get_device(device)
        self.path = ensure_model(model)
        check_draft_max(draft_max)
        self.draft_max = draft_max
        self.draft_adaptive = draft_adaptive
        self.draft_vocab = draft_vocab
        # Draft models by path, loaded once and shared by every session that drafts with them.
        self._draft_models: dict = {}
        if threads is not None:
            kernels.set_threads(threads)
        self.gguf = open_gguf(self.path)
        try:
            self.model = load_model(self.gguf, self.path, self.device)
            self.model.quantize_activations = quantize_activations
            self.tokenizer = Tokenizer.from_gguf(self.gguf)
            if n_ctx is None:
                n_ctx = min(self.model.hparams.n_ctx_train, DEFAULT_N_CTX)
            self.cache_spec = CacheSpec(policy=cache, n_ctx=n_ctx, sinks=sinks, window=window, kv_dtype=kv_dtype)
            self.n_ctx = n_ctx
            self.cache = self.model.new_cache(self.cache_spec)
            self.draft = self._resolve_draft(draft)
            self._speculation = self.speculation(self.draft, self.cache_spec)
            # Draft models share the device, so on the GPU no kernel runs on the CPU.
            if self.device is CPU:
                files = [self.gguf, *(gguf for gguf, _ in self._draft_models.values())]
                matrix_types = {
                    t.type for f in files for t in f.tensors.values() if len(t.shape) == 2 and t.type in kernels.KERNELS
                }
                warmup.warm_up(sorted(matrix_types), progress=compile_progress)
        except BaseException:
            self._close_files()
            raise
        self.load_seconds = time.perf_counter() - started

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
        """float32 logits (len(ids), n_vocab) of every position of `ids` on a fresh context
        (under the sink policy, each token sees the sinks and the window before it)."""
        with self._lock:
            self.reset()
            return self.model.forward(ids, self.cache, all_logits=True)

    @property
    def has_chat_template(self) -> bool:
        """Whether the file carries its own chat template (instruct models usually do)."""
        return "tokenizer.chat_template" in self.gguf.metadata

    @cached_property
    def chat_template(self) -> ChatTemplate:
        """The file's chat template, or the built-in fallback for its architecture."""
        return ChatTemplate.from_gguf(self.gguf, self.tokenizer)

    def stream(self, prompt: str | Sequence[int], **options) -> Generation:
        """Generate from `prompt` (text, BOS added when the model uses one; or token ids as
        they are), yielding `Chunk`s; the returned Generation's `completion` is set at the end.

        Options: the `SamplingParams` fields (temperature, top_k, top_p, min_p, repeat_penalty,
        presence_penalty, frequency_penalty, penalty_last_n, seed, logit_bias), max_tokens
        (default 256, None: until the context is full, or without end under the sink policy),
        stop (strings), cancel (a threading.Event, also checked between prefill blocks) and
        progress (`progress(done, total)` after each prefill block). The model serves one
        generation at a time: others wait until this one ends or is closed (breaking out of the
        loop and dropping it is enough).
        """
        return self._generation(self._prompt_ids(prompt), options)

    def generate(self, prompt: str | Sequence[int], **options) -> Completion:
        """Like `stream`, but returns the whole `Completion`."""
        return self.stream(prompt, **options).run()

    def chat(self, messages: Sequence[dict], stream: bool = False, **options) -> Completion | Generation:
        """Answer `messages` ([{"role": ..., "content": ...}, ...]) as the assistant, through
        the model's chat template; options as for `stream`."""
        generation = self._generation(self.chat_prompt(messages), options)
        return generation if stream else generation.run()

    def chat_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Token ids `chat` generates from: the rendered template, its special tokens parsed."""
        text = self.chat_template.render(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special=True, parse_special=True)
        bos = self.tokenizer.bos_id
        # Templates that write BOS themselves would otherwise get a second one from encode.
        if len(ids) >= 2 and bos is not None and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        if isinstance(prompt, Sequence) and all(
            isinstance(i, Integral) and not isinstance(i, bool) and 0 <= i < self.n_vocab for i in prompt
        ):
            return [int(i) for i in prompt]
        raise InvalidParameterError(
            f"prompt must be a str or a sequence of token ids below {self.n_vocab}, got {type(prompt).__name__}"
        )

    def _generation(self, ids: list[int], options: dict) -> Generation:
        return Generation(
            self.model,
            self.tokenizer,
            ids,
            GenerationRequest.from_kwargs(options),
            prepare_cache=self._fresh_cache,
            n_ctx=self.n_ctx if self.cache_spec.policy == "full" else None,
            lock=self._lock,
            load_seconds=self.load_seconds,
            speculation=self._speculation,
        )

    def _resolve_draft(self, draft) -> str | Path | None:
        """LOOKUP, the path of a draft model, or None (no speculation) for a `draft` argument."""
        if draft is None or draft == LOOKUP:
            return draft
        if draft == AUTO:
            entry = entry_for_path(self.path)
            draft = entry.draft if entry is not None and entry.draft else LOOKUP
            if draft == LOOKUP:
                return draft
        if not isinstance(draft, (str, os.PathLike)):
            raise InvalidParameterError(f"draft must be a model, {AUTO!r}, {LOOKUP!r} or None, got {draft!r}")
        return ensure_model(draft)

    def speculation(self, draft, spec: CacheSpec) -> Speculation | None:
        """A new drafter for `draft` (as `LLM(draft=...)` takes it) over caches of `spec`, with its
        own draft-length policy; None without a draft."""
        draft = self._resolve_draft(draft)
        if draft is None:
            return None
        policy = DraftLengthPolicy(self.draft_max, adaptive=self.draft_adaptive)
        if draft == LOOKUP:
            return Speculation(PromptLookupDrafter(), policy)
        if draft not in self._draft_models:
            self._draft_models[draft] = load_draft_model(
                draft, self.model, self.tokenizer, self.model.quantize_activations, self.draft_vocab
            )
        return Speculation(DraftModelDrafter(self._draft_models[draft][1], spec), policy)

    def _fresh_cache(self, prompt_ids: list[int]):
        self.reset()
        return self.cache, 0

    def session(self, system: str | None = None, cache: CacheSpec | str | None = None, draft=SAME_AS_LLM,
                messages=None, **options):  # fmt: skip
        """A new conversation (`Session`) over this model, with its own KV cache: `cache` is a
        CacheSpec, a policy name ("full", "sink") with this LLM's other cache settings, or None
        for this LLM's. `draft` as for `LLM` (default: this LLM's own); `messages` a conversation
        to continue (see `Session`); `options` are the default generation options of every `send`."""
        from localllm.runtime.session import Session

        return Session(self, system=system, cache=cache, draft=self.draft if draft is SAME_AS_LLM else draft,
                       messages=messages, **options)  # fmt: skip

    def close(self) -> None:
        """Release the file; waits for a generation running in another thread to end."""
        with self._lock:
            self._close_files()

    def _close_files(self) -> None:
        self.gguf.close()
        for gguf, _ in self._draft_models.values():
            gguf.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
