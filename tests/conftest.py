import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "reference"

CATALOG_MODELS = [
    "smollm2-135m-instruct",
    "gemma-3-270m",
    "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b-instruct",
]
# The models small enough for the quick subset (`-m "not slow"`).
FAST_MODELS = ["smollm2-135m-instruct"]


def model_params(names=CATALOG_MODELS):
    """Parametrize over catalog models, marking all but the smallest as slow."""
    return [
        pytest.param(name, marks=() if name in FAST_MODELS else pytest.mark.slow, id=name)
        for name in names
    ]


@pytest.fixture(scope="session")
def model_path():
    """Path of a catalog model in the user's model store, pulled on first use and reused."""
    from localllm.runtime.catalog import ensure_model

    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = ensure_model(name)
        return cache[name]

    return get


def load_reference(name: str) -> dict:
    return json.loads((REFERENCE / f"{name}.json").read_text())
