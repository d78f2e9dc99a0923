import json
import os
from pathlib import Path

import pytest

# Without a CUDA device the GPU tests run the Triton kernels through Triton's interpreter on CPU
# tensors; triton reads this when it is imported, so it is set before any test module loads.
# (A device node is the cheap sign of a GPU: importing torch to ask would slow every run.)
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
    return [pytest.param(name, marks=() if name in FAST_MODELS else pytest.mark.slow, id=name) for name in names]


def quick_subset(config) -> bool:
    """True when slow tests are deselected, as the README's quick command does."""
    return "not slow" in " ".join((config.option.markexpr or "").split())


@pytest.fixture(scope="session")
def model_path(request):
    """Path of a catalog model in the user's model store, pulled on first use and reused.

    The quick subset must need only the default model: asking for another one there fails the
    test (mark it slow) instead of silently pulling hundreds of megabytes.
    """
    from localllm.runtime.catalog import ensure_model

    cache = {}
    quick = quick_subset(request.config)

    def get(name: str) -> Path:
        if quick and name not in FAST_MODELS:
            pytest.fail(f"{name} is not one of the quick subset's models {FAST_MODELS}: mark this test slow")
        if name not in cache:
            cache[name] = ensure_model(name)
        return cache[name]

    return get


def load_reference(name: str) -> dict:
    return json.loads((REFERENCE / f"{name}.json").read_text())


# A greedy token that llama.cpp chose by less than this many logits over the runner-up may go
# the other way on another CPU, or here, where logits differ from llama.cpp's by up to ~0.3 at
# the median: greedy sequences are compared only before the first such step.
NEAR_TIE_MARGIN = 0.25
# Tokens that must remain to compare, per model over all its cases, so a test cannot pass by
# comparing nothing.
MIN_COMPARED_TOKENS = 12


def comparable_greedy(name: str, case: dict) -> list[int]:
    """The reference's greedy tokens for `case` up to its first near-tie, by the margins that
    tests/data/reference/greedy_margins.py recorded from llama.cpp."""
    margins = json.loads((REFERENCE / f"{name}.greedy_margins.json").read_text())["cases"][case["name"]]["margins"]
    assert len(margins) == len(case["greedy"])
    end = next((i for i, margin in enumerate(margins) if margin < NEAR_TIE_MARGIN), len(margins))
    return case["greedy"][:end]
