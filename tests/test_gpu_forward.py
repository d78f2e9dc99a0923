"""The GPU forward path (`device="cuda"`): the same architecture files on torch tensors and the
Triton kernels, against the CPU path with float activations; and the one-line errors where it
cannot run.

Without a CUDA device these run the kernels through Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set by conftest.py before triton is imported), which is slow: the full
SmolLM2 forward is marked slow and kept to a few tokens. The interpreter has no bf16, so
everything here is f16 or f32.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from localllm import DeviceError, InvalidParameterError
from localllm.runtime.cache import CacheLayout, CacheSpec, new_cache
from localllm.runtime.device import CPU, TorchDevice, get_device
from localllm.runtime.llm import LLM

from test_models import TINY, assert_within_tolerances, write_tiny_llama

SMOLLM = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cuda(torch):
    """The "cuda" device: a real one, or the interpreter on CPU tensors."""
    pytest.importorskip("triton")
    try:
        return get_device("cuda")
    except DeviceError as error:
        pytest.skip(str(error))


def agreement(gpu: np.ndarray, cpu: np.ndarray) -> tuple[float, float, float]:
    """Top-1 agreement and the median and largest |Δ| over each row's CPU top 10, the measures
    test_models applies against llama.cpp."""
    top10 = np.argsort(-cpu, axis=-1)[:, :10]
    deltas = np.abs(np.take_along_axis(gpu, top10, -1) - np.take_along_axis(cpu, top10, -1))
    return float(np.mean(gpu.argmax(-1) == cpu.argmax(-1))), float(np.median(deltas)), float(deltas.max())


def test_tiny_model_on_the_gpu_matches_the_cpu(tmp_path, cuda):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    from localllm.formats.gguf import open_gguf
    from localllm.runtime.models import load_model

    ids = [1, 5, 2, 9]
    logits = {}
    for device in (CPU, cuda):
        with open_gguf(path) as gguf:
            model = load_model(gguf, path, device)
            model.quantize_activations = False
            cache = model.new_cache(CacheSpec(n_ctx=8, kv_dtype="f32"))
            prefill = model.forward(ids, cache, all_logits=True)
            step = model.forward([3], cache, all_logits=True)
            logits[device.name] = np.vstack([prefill, step])
    assert logits["cuda"].shape == (5, TINY["n_vocab"])
    np.testing.assert_allclose(logits["cuda"], logits["cpu"], rtol=1e-4, atol=1e-4)


def test_the_sink_policy_on_the_gpu_matches_the_cpu_past_evictions(tmp_path, cuda):
    """Sinks 2 + window 4: from the seventh token on, entries are evicted and the sinks are
    scored with in-cache query positions, on the device as on the CPU."""
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    from localllm.formats.gguf import open_gguf
    from localllm.runtime.models import load_model

    ids = [1, 5, 2, 9, 3, 7, 4, 11, 6, 2, 8, 1]
    logits = {}
    for device in (CPU, cuda):
        with open_gguf(path) as gguf:
            model = load_model(gguf, path, device)
            model.quantize_activations = False
            cache = model.new_cache(CacheSpec(policy="sink", sinks=2, window=4, kv_dtype="f16"))
            rows = [model.forward(ids[:3], cache, all_logits=True)]
            rows += [model.forward([token], cache, all_logits=True) for token in ids[3:]]
            assert cache.evicted == len(ids) - 6
            logits[device.name] = np.vstack(rows)
    np.testing.assert_allclose(logits["cuda"], logits["cpu"], rtol=1e-3, atol=1e-3)


def smollm2_logits(path, prompt, steps, **options) -> np.ndarray:
    """Logits of every prompt token, then of each decode step feeding `steps` one at a time."""
    with LLM(path, n_ctx=16, **options) as llm:
        cache = llm.model.new_cache(16)
        rows = [llm.model.forward(prompt, cache, all_logits=True)]
        rows += [llm.model.forward([token], cache, all_logits=True) for token in steps]
    logits = np.vstack(rows)
    assert logits.dtype == np.float32
    return logits


@pytest.mark.slow
def test_smollm2_on_the_gpu_matches_the_cpu(model_path, cuda):
    """A 10-token prompt (the products take the tiled matmul path past 8 rows) and two decode
    steps (matvec, and attention split over the cache)."""
    path = model_path(SMOLLM)
    with LLM(path, n_ctx=16) as llm:
        tokens = llm.tokenize("The capital of France is Paris. The capital of Germany is Berlin.")[:12]
    assert len(tokens) == 12
    cpu = smollm2_logits(path, tokens[:10], tokens[10:], quantize_activations=False)
    gpu = smollm2_logits(path, tokens[:10], tokens[10:], device="cuda")
    assert gpu.shape == cpu.shape == (12, cpu.shape[1])
    assert_within_tolerances(*agreement(gpu, cpu))


def cache_steps(device, kv_dtype: str) -> list:
    """Views of a windowed and a global layer after each of a run of appends that makes the
    windowed one shift entries out, then the cache saved (held_arrays) and restored."""
    rng = np.random.default_rng(1)
    layout = CacheLayout(n_layer=2, n_head_kv=2, head_dim_k=4, head_dim_v=4, windows=(3, 0), max_append=4,
                         max_rollback=2)  # fmt: skip
    cache = new_cache(layout, CacheSpec(n_ctx=32, kv_dtype=kv_dtype), device)
    seen = []
    for n in (4, 1, 3, 1, 4, 2):
        cache.append(n)
        for layer in range(2):
            k, v = rng.standard_normal((2, n, 2, 4), dtype=np.float32)
            cache.write(layer, device.asarray(k), device.asarray(v))
            view = cache.view(layer)
            seen.append([device.numpy(a).copy() for a in (view.keys, view.values, view.positions)])
    saved = [tuple(a.copy() for a in arrays[1:]) for arrays in cache.held_arrays()]
    restored = new_cache(layout, CacheSpec(n_ctx=32, kv_dtype=kv_dtype), device)
    restored.restore(cache.state(), saved)
    seen.append([a for _, *arrays in restored.held_arrays() for a in arrays])
    return seen


@pytest.mark.parametrize("kv_dtype", ["f16", "f32"])
def test_kv_cache_on_torch_tensors_holds_what_the_numpy_one_holds(torch, kv_dtype):
    on_torch = cache_steps(TorchDevice(torch, "cpu"), kv_dtype)
    on_numpy = cache_steps(CPU, kv_dtype)
    for torch_arrays, numpy_arrays in zip(on_torch, on_numpy, strict=True):
        for a, b in zip(torch_arrays, numpy_arrays, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_an_unknown_device_is_an_invalid_parameter():
    with pytest.raises(InvalidParameterError, match="device must be one of cpu, cuda, got 'tpu'"):
        LLM("no-such-model", device="tpu")


def run_generate_on_cuda(prelude: str, env: dict) -> subprocess.CompletedProcess:
    """`localllm generate --device cuda` in a fresh interpreter that first runs `prelude`: the
    device is refused before any model is looked up, so the model need not exist."""
    script = (
        f"import sys; {prelude}; from localllm.runtime.cli import main; "
        "sys.exit(main(['generate', '--device', 'cuda', '-m', 'no-such-model', 'hello']))"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)


def assert_one_line_device_error(result, reason: str):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localllm: error: cannot run on cuda: "), result.stderr
    assert reason in lines[0]


def test_cuda_without_torch_is_one_line_naming_torch():
    # None in sys.modules makes `import torch` fail, as where torch is not installed.
    result = run_generate_on_cuda("sys.modules['torch'] = None", dict(os.environ))
    assert_one_line_device_error(result, "torch cannot be imported")
    assert "pip install 'localllm[gpu]'" in result.stderr


def test_cuda_without_a_device_or_the_interpreter_is_one_line(torch):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = run_generate_on_cuda("pass", env)
    assert_one_line_device_error(result, "no CUDA device found")
    assert "TRITON_INTERPRET=1" in result.stderr
