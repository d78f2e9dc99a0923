"""Norms, RoPE, softmax and gated activations against float64 NumPy references, plus threads."""

import os
import subprocess
import sys
import threading
import time

import numba
import numpy as np
import pytest

from localllm.errors import InvalidParameterError, KernelError
from localllm.kernels.cpu.ops import geglu, rms_norm, rope, softmax, swiglu, warm_up_ops
from localllm.kernels.cpu.threads import (
    THREADS_ENV_VAR,
    apply_threads,
    get_threads,
    max_threads,
    set_threads,
    threads_from_environment,
)

REL = 1e-5


def assert_close(got, reference, rel=REL):
    """Max abs error within `rel` of the reference's largest magnitude (elementwise relative
    error is meaningless where a value cancels to ~0)."""
    assert got.dtype == np.float32
    assert got.shape == reference.shape
    scale = np.max(np.abs(reference))
    error = np.max(np.abs(got.astype(np.float64) - reference))
    assert error <= rel * scale, f"max error {error:.3g} vs allowed {rel * scale:.3g}"


def rng_f32(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def compiled():
    warm_up_ops()


# --- RMS norm ---------------------------------------------------------------------------------


def rms_norm_reference(x, weight, eps):
    x = x.astype(np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight.astype(np.float64)


# Row counts on both sides of the serial/parallel switch.
@pytest.mark.parametrize("rows", [1, 5, 600])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_matches_reference(rows, with_weight):
    rng = np.random.default_rng(rows)
    x = rng_f32(rng, (rows, 576), scale=3.0)
    weight = rng_f32(rng, (576,)) if with_weight else None
    assert_close(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5))


def test_rms_norm_per_head_3d():
    rng = np.random.default_rng(1)
    x = rng_f32(rng, (7, 4, 256))
    weight = rng_f32(rng, (256,))
    got = rms_norm(x, weight, 1e-6)
    assert got.shape == (7, 4, 256)
    assert_close(got, rms_norm_reference(x, weight, 1e-6))


def test_rms_norm_in_place_and_eps_dominates_tiny_rows():
    rng = np.random.default_rng(2)
    x = rng_f32(rng, (3, 64), scale=1e-4)
    reference = rms_norm_reference(x, None, 1e-2)
    result = rms_norm(x, None, 1e-2, out=x)
    assert result is x
    assert_close(x, reference)
    # eps = 1e-2 swamps mean(x^2) ~ 1e-8: the scale is ~1/sqrt(eps) = 10, not ~1e4.
    assert np.max(np.abs(x)) < 1e-2


# --- RoPE -------------------------------------------------------------------------------------


def rope_reference(x, positions, n_rot, base, freq_scale, neox):
    y = x.astype(np.float64).copy()
    half = n_rot // 2
    i = np.arange(half, dtype=np.float64)
    theta = positions.astype(np.float64)[:, None] * freq_scale * base ** (-2.0 * i / n_rot)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    if neox:
        first, second = np.arange(half), np.arange(half) + half
    else:
        first, second = 2 * np.arange(half), 2 * np.arange(half) + 1
    a, b = y[:, :, first], y[:, :, second]
    y[:, :, first] = a * cos - b * sin
    y[:, :, second] = a * sin + b * cos
    return y


@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
@pytest.mark.parametrize(
    "n_rot, head_dim, base, freq_scale",
    [(64, 64, 10000.0, 1.0), (128, 128, 1000000.0, 1.0), (32, 64, 10000.0, 0.25), (256, 256, 10000.0, 0.125)],
)
@pytest.mark.parametrize("position_dtype", [np.int32, np.int64])
def test_rope_matches_reference_up_to_32k(neox, n_rot, head_dim, base, freq_scale, position_dtype):
    rng = np.random.default_rng(n_rot + head_dim)
    positions = np.concatenate([np.arange(8), rng.integers(0, 32769, 40), [32767, 32768]])
    positions = positions.astype(position_dtype)
    x = rng_f32(rng, (positions.shape[0], 3, head_dim))
    reference = rope_reference(x, positions, n_rot, base, freq_scale, neox)
    got = rope(x, positions, n_rot=n_rot, base=base, freq_scale=freq_scale, neox=neox)
    assert got is x
    for token in range(x.shape[0]):
        assert_close(got[token], reference[token])
    # Dims past n_rot pass through bit for bit.
    assert np.array_equal(got[:, :, n_rot:], reference[:, :, n_rot:].astype(np.float32))


def test_rope_modes_pair_different_dims():
    x = np.zeros((1, 1, 8), dtype=np.float32)
    x[0, 0, 0] = 1.0
    positions = np.array([1], dtype=np.int32)
    normal = rope(x.copy(), positions, n_rot=8, base=10000.0, neox=False)
    neox = rope(x.copy(), positions, n_rot=8, base=10000.0, neox=True)
    # Dim 0's partner is dim 1 in normal mode and dim n_rot/2 = 4 in NeoX mode.
    assert normal[0, 0, 1] == pytest.approx(np.sin(1.0), rel=1e-6)
    assert neox[0, 0, 4] == pytest.approx(np.sin(1.0), rel=1e-6)
    assert normal[0, 0, 4] == 0.0 and neox[0, 0, 1] == 0.0


def test_rope_parallel_path_matches_reference():
    rng = np.random.default_rng(5)
    positions = rng.permutation(600).astype(np.int64)
    x = rng_f32(rng, (600, 4, 64))
    reference = rope_reference(x, positions, 64, 10000.0, 1.0, True)
    assert_close(rope(x, positions, n_rot=64, base=10000.0, neox=True), reference)


# --- softmax ----------------------------------------------------------------------------------


def softmax_reference(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("shape", [(1, 10), (4, 1000), (300, 257), (1, 151936)])
def test_softmax_matches_reference(shape):
    rng = np.random.default_rng(shape[1])
    x = rng_f32(rng, shape, scale=8.0)
    got = softmax(x)
    np.testing.assert_allclose(got, softmax_reference(x), rtol=REL, atol=0)


def test_softmax_is_stable_and_handles_masked_rows():
    x = np.array([[1000.0, 999.0, -np.inf], [-np.inf, -np.inf, -np.inf]], dtype=np.float32)
    got = softmax(x, out=x)
    assert got is x
    np.testing.assert_allclose(got[0], [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0], rtol=REL)
    assert np.array_equal(got[1], np.zeros(3, dtype=np.float32))


# --- gated activations ------------------------------------------------------------------------


def silu_reference(x):
    x = x.astype(np.float64)
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def gelu_tanh_formula(x):
    """ggml's GELU exactly as written, in float64; 1 + tanh cancels in the far negative tail."""
    x = x.astype(np.float64)
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def gelu_tanh_reference(x):
    """The same function via 1 + tanh(u) = 2 / (1 + exp(-2u)), accurate in the tails too."""
    x = x.astype(np.float64)
    u = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-2.0 * u))


def test_geglu_matches_ggml_formula():
    rng = np.random.default_rng(3)
    gate = rng_f32(rng, (8, 512), scale=4.0)
    up = rng_f32(rng, (8, 512))
    assert_close(geglu(gate, up), gelu_tanh_formula(gate) * up.astype(np.float64))


@pytest.mark.parametrize(
    "op, activation",
    [(swiglu, silu_reference), (geglu, gelu_tanh_reference)],
    ids=["swiglu", "geglu"],
)
@pytest.mark.parametrize("shape", [(1, 8960), (3, 100), (40, 2048)])
def test_gated_activation_matches_reference(op, activation, shape):
    rng = np.random.default_rng(shape[1])
    gate = rng_f32(rng, shape, scale=3.0)
    up = rng_f32(rng, shape)
    reference = activation(gate) * up.astype(np.float64)
    got = op(gate, up)
    # Element by element: the ops keep full relative precision in the negative tails too.
    np.testing.assert_allclose(got, reference, rtol=REL, atol=1e-30)


@pytest.mark.parametrize(
    "op, activation",
    [(swiglu, silu_reference), (geglu, gelu_tanh_reference)],
    ids=["swiglu", "geglu"],
)
def test_gated_activation_extremes_and_in_place(op, activation):
    gate = np.array([[-1e30, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e30]], dtype=np.float32)
    up = np.full_like(gate, 2.0)
    reference = activation(gate) * 2.0
    got = op(gate, up, out=gate)
    assert got is gate
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, reference, rtol=REL, atol=1e-30)


# --- argument checks --------------------------------------------------------------------------

F32 = np.zeros((2, 8), dtype=np.float32)
X3 = np.zeros((2, 2, 8), dtype=np.float32)
POS = np.arange(2, dtype=np.int32)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rms_norm(F32.astype(np.float64), None, 1e-5), "float32"),
        (lambda: rms_norm(np.zeros((4, 8), np.float32)[:, ::2], None, 1e-5), "C-contiguous"),
        (lambda: rms_norm(F32, np.ones(7, np.float32), 1e-5), "weight has 7"),
        (lambda: rms_norm(np.zeros(8, np.float32), None, 1e-5), "2-D or 3-D"),
        (lambda: rms_norm(F32, None, float("nan")), "eps"),
        (lambda: rms_norm(F32, None, 1e-5, out=np.zeros((2, 9), np.float32)), "out must have shape"),
        (lambda: rms_norm([[1.0]], None, 1e-5), "numpy array"),
        (lambda: rope(X3, np.arange(3, dtype=np.int32), n_rot=8, base=1e4, neox=False), "positions"),
        (lambda: rope(X3, np.arange(2.0), n_rot=8, base=1e4, neox=False), "int32 or int64"),
        (lambda: rope(X3, POS, n_rot=7, base=1e4, neox=False), "n_rot"),
        (lambda: rope(X3, POS, n_rot=10, base=1e4, neox=False), "n_rot"),
        (lambda: rope(X3, POS, n_rot=8, base=-1.0, neox=False), "base"),
        (lambda: rope(F32, POS, n_rot=8, base=1e4, neox=False), "3-D"),
        (lambda: softmax(X3), "2-D"),
        (lambda: softmax(F32.astype(np.float16)), "float32"),
        (lambda: swiglu(F32, np.zeros((2, 9), np.float32)), "same shape"),
        (lambda: geglu(F32, F32, out=np.zeros((2, 8), np.float64)), "float32"),
    ],
)
def test_bad_arguments_raise_kernel_error(call, message):
    with pytest.raises(KernelError, match=message):
        call()


def test_rejected_rope_leaves_input_untouched():
    x = np.ones((2, 1, 8), dtype=np.float32)
    with pytest.raises(KernelError):
        rope(x, np.array([5, 6, 7], dtype=np.int64), n_rot=8, base=1e4, neox=True)
    assert np.array_equal(x, np.ones((2, 1, 8), dtype=np.float32))


# --- threads ----------------------------------------------------------------------------------


def test_set_threads_reaches_other_python_threads():
    original = get_threads()
    try:
        set_threads(1)
        assert get_threads() == 1
        seen = []

        def worker():
            apply_threads()
            seen.append(numba.get_num_threads())

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert seen == [1]
    finally:
        set_threads(original)


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(9)
    x = rng_f32(rng, (600, 576))
    original = get_threads()
    try:
        set_threads(1)
        single = rms_norm(x, None, 1e-5)
        set_threads(max_threads())
        assert np.array_equal(rms_norm(x, None, 1e-5), single)
    finally:
        set_threads(original)


@pytest.mark.parametrize("bad", [0, -1, max_threads() + 1, 1.5, True, "2"])
def test_set_threads_rejects_bad_counts(bad):
    with pytest.raises(InvalidParameterError):
        set_threads(bad)


@pytest.mark.parametrize("value, expected", [("1", 1), (" 2 ", min(2, max_threads())), ("", "auto"), ("auto", "auto")])
def test_thread_count_from_environment(monkeypatch, value, expected):
    monkeypatch.setenv(THREADS_ENV_VAR, value)
    assert threads_from_environment() == expected


@pytest.mark.parametrize("value", ["lots", "0", "-3", str(max_threads() + 1)])
def test_bad_thread_count_in_environment_is_named(monkeypatch, value):
    monkeypatch.setenv(THREADS_ENV_VAR, value)
    with pytest.raises(InvalidParameterError, match=THREADS_ENV_VAR):
        threads_from_environment()


def test_environment_thread_count_applies_on_import():
    script = "from localllm.kernels.cpu.threads import get_threads; print(get_threads())"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"LOCALLLM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores: one to keep busy, one to keep")
def test_auto_threads_give_up_the_cores_other_processes_keep_busy():
    """Busy loops pinned to all our cores but one: auto mode must use at most that one core's
    worth of threads (fewer if something else is busy too), never spin on the busy cores."""
    from localllm.kernels.cpu import threads

    cpus = sorted(os.sched_getaffinity(0))
    busy = [
        subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", "while True: pass"]) for cpu in cpus[:-1]
    ]
    try:
        free_cores = threads._FreeCores()
        assert free_cores.count(max_threads(), current=7) == 7  # a first sample decides nothing
        time.sleep(1.0)
        assert free_cores.count(max_threads(), current=7) <= len(cpus) - len(busy)
    finally:
        for process in busy:
            process.kill()
            process.wait()
