"""localllm: local LLM inference from GGUF files."""

from localllm.errors import (
    CancelledError,
    ContextOverflowError,
    DeviceError,
    GGUFError,
    IncompatibleDraftError,
    InvalidParameterError,
    KernelError,
    LocalLLMError,
    ModelError,
    ModelNotFoundError,
    OutOfMemoryError,
    PullError,
    QuantizeError,
    SessionFileError,
    TemplateError,
    TokenizerError,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # Deferred so that `import localllm` (and the CLI's error paths) need not load Numba.
    if name == "LLM":
        from localllm.runtime.llm import LLM

        return LLM
    if name == "Session":
        from localllm.runtime.session import Session

        return Session
    raise AttributeError(f"module 'localllm' has no attribute {name!r}")


__all__ = [
    "CancelledError",
    "ContextOverflowError",
    "DeviceError",
    "GGUFError",
    "IncompatibleDraftError",
    "InvalidParameterError",
    "KernelError",
    "LLM",
    "LocalLLMError",
    "ModelError",
    "ModelNotFoundError",
    "OutOfMemoryError",
    "PullError",
    "QuantizeError",
    "Session",
    "SessionFileError",
    "TemplateError",
    "TokenizerError",
    "__version__",
]
