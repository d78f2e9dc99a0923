"""One exception hierarchy for everything localllm raises on purpose.

The CLI catches `LocalLLMError` and prints its message on one line; anything else is a bug.
"""


class LocalLLMError(Exception):
    """Base of every error localllm raises deliberately."""


class GGUFError(LocalLLMError):
    """A GGUF file is malformed, truncated, or uses something we do not support."""


class ModelNotFoundError(LocalLLMError):
    """A model name is not in the catalog and is not a path to a file."""


class PullError(LocalLLMError):
    """Fetching or verifying a catalog model failed."""


class TokenizerError(LocalLLMError):
    """The tokenizer described by a GGUF file cannot be built or used."""


class TemplateError(LocalLLMError):
    """A chat template failed to render, or tried to leave its sandbox."""


class ModelError(LocalLLMError):
    """A model's architecture or tensors are missing or inconsistent."""


class KernelError(LocalLLMError):
    """Arguments handed to a compute kernel have the wrong shape, type or length."""


class InvalidParameterError(LocalLLMError):
    """A caller passed a value outside its valid range (a negative temperature, say)."""


class ContextOverflowError(LocalLLMError):
    """A prompt does not fit in the context window."""


class OutOfMemoryError(LocalLLMError):
    """Something would not fit in the memory that is available (a KV cache for a huge n_ctx)."""


class CancelledError(LocalLLMError):
    """A long computation (a prompt's prefill) was stopped through its cancel event."""


class SessionFileError(LocalLLMError):
    """A saved session cannot be loaded: truncated, another format version, or another model."""


class IncompatibleDraftError(LocalLLMError):
    """A draft model for speculative decoding does not share the target's vocabulary."""


class QuantizeError(LocalLLMError):
    """A model cannot be quantized as asked (names the tensor where there is one)."""


class DeviceError(LocalLLMError):
    """The device asked for cannot be used here (no torch or triton, no CUDA device)."""
