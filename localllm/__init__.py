"""localllm: local LLM inference from GGUF files."""

from localllm.errors import (
    ContextOverflowError,
    GGUFError,
    InvalidParameterError,
    KernelError,
    LocalLLMError,
    ModelError,
    ModelNotFoundError,
    PullError,
    TemplateError,
    TokenizerError,
)

__version__ = "0.1.0"

__all__ = [
    "ContextOverflowError",
    "GGUFError",
    "InvalidParameterError",
    "KernelError",
    "LocalLLMError",
    "ModelError",
    "ModelNotFoundError",
    "PullError",
    "TemplateError",
    "TokenizerError",
    "__version__",
]
