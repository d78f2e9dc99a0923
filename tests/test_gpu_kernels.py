"""The Triton kernels of localllm.kernels.gpu against their Numba twins in localllm.kernels.cpu.

On a CUDA device the kernels run compiled; elsewhere through Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set by conftest.py, or here when this module is run alone, before triton
is imported). The interpreter has no bf16, so the tests use f16 and f32 activations and caches.

Errors are norm-relative, ‖gpu − cpu‖ / ‖cpu‖ in float64: both sides compute in float32 and
round differently (another summation order, tensor-core products), so a per-element test would
need an absolute floor for the near-zero outputs of a dot product, while a misread bit or a
shifted scale moves the norm by ~1e-2 or more. Products allow 1e-4: the matmul's tf32x3
tensor-core dots are accurate to ~1e-6 per product, well inside it, and the CPU's float kernels
are exact to float32 rounding. Ops and attention allow 1e-5.
"""

import importlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from gguf import GGMLQuantizationType  # noqa: E402

from localllm.errors import KernelError  # noqa: E402
from localllm.kernels import cpu, gpu  # noqa: E402
from localllm.kernels.gpu import products  # noqa: E402

from kernel_helpers import random_activations, random_weight, relative_error  # noqa: E402

Q = GGMLQuantizationType
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")

PRODUCT_TOLERANCE = 1e-4
OP_TOLERANCE = 1e-5

GPU_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.TQ2_0]


def on_device(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)


def host(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


def test_supported_types_cover_the_brief():
    assert set(GPU_TYPES) == set(gpu.SUPPORTED_TYPES)


# --- products and embeddings ----------------------------------------------------------------------


@pytest.fixture(params=["gpu tiles", "interpreter tiles"] if DEVICE.type == "cpu" else ["gpu tiles"])
def tiles(request, monkeypatch):
    """Under the interpreter, the products run with the tiles a GPU launches and with the big
    ones the interpreter takes for itself (products.HOST_TILES)."""
    monkeypatch.setattr(products, "HOST_TILES", request.param == "interpreter tiles")


@pytest.mark.parametrize("blocks", [1, 2, 7])
@pytest.mark.parametrize("qtype", GPU_TYPES, ids=lambda t: t.name)
def test_products_match_the_cpu_float_kernels(qtype, blocks, tiles):
    """Rows of 1, 2 and 7 blocks (ragged against the units a step takes), 19 rows (ragged against
    the rows a program takes); n = 1 and 3 (the matvec kernel), 16 (the tl.dot kernel)."""
    weight = random_weight(qtype, 19, blocks, seed=blocks)
    checked = gpu.CheckedWeight(weight, device=DEVICE)
    cols = weight.shape[1]
    X = random_activations(16, cols, seed=blocks + 1)
    want = cpu.matvec(weight, X[0], quantize=False)
    got = host(gpu.matvec(checked, on_device(X[0])))
    assert got.shape == (19,)
    assert relative_error(got, want) <= PRODUCT_TOLERANCE
    for n in (1, 3, 16):
        want = cpu.matmul(weight, X[:n], quantize=False)
        got = host(gpu.matmul(checked, on_device(X[:n]), quantize=True))
        assert got.shape == (n, 19)
        assert relative_error(got, want) <= PRODUCT_TOLERANCE, n


@pytest.mark.parametrize("qtype", GPU_TYPES, ids=lambda t: t.name)
def test_embed_matches_the_cpu_dequantization(qtype):
    weight = random_weight(qtype, 9, 3, seed=5)
    checked = gpu.CheckedWeight(weight, device=DEVICE)
    ids = np.array([8, 0, 3, 3], dtype=np.int64)
    want = cpu.embed(weight, ids)
    got = host(gpu.embed(checked, on_device(ids)))
    assert relative_error(got, want) <= OP_TOLERANCE
    assert host(gpu.embed(checked, [2])).shape == (1, weight.shape[1])


def test_checked_weight_uploads_the_raw_bytes_once():
    weight = random_weight(Q.Q4_K, 3, 2)
    weight.raw.flags.writeable = False
    checked = gpu.CheckedWeight(weight, device=DEVICE)
    assert checked.raw.dtype == torch.uint8 and checked.raw.device.type == DEVICE.type
    assert np.array_equal(host(checked.raw), weight.raw)
    assert checked.type == Q.Q4_K and checked.shape == (3, 512) and checked.name == "random"


def test_products_take_an_out_tensor():
    weight = random_weight(Q.Q8_0, 5, 2)
    checked = gpu.CheckedWeight(weight, device=DEVICE)
    X = random_activations(4, 64)
    out = torch.empty((4, 5), dtype=torch.float32, device=DEVICE)
    assert gpu.matmul(checked, on_device(X), out) is out
    assert relative_error(host(out), cpu.matmul(weight, X, quantize=False)) <= PRODUCT_TOLERANCE


# --- ops ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 64), (2, 5000)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(shape, with_weight):
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape).astype(np.float32) * 3
    weight = rng.standard_normal(shape[-1]).astype(np.float32) if with_weight else None
    want = cpu.rms_norm(x, weight, 1e-6)
    gpu_weight = None if weight is None else on_device(weight)
    assert relative_error(host(gpu.rms_norm(on_device(x), gpu_weight, 1e-6)), want) <= OP_TOLERANCE
    # In place, as the forward path may call it.
    t = on_device(x)
    assert gpu.rms_norm(t, gpu_weight, 1e-6, out=t) is t
    assert relative_error(host(t), want) <= OP_TOLERANCE


@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
@pytest.mark.parametrize("position_dtype", [np.int32, np.int64])
def test_rope_rotates_in_place(neox, position_dtype):
    rng = np.random.default_rng(int(neox))
    x = rng.standard_normal((5, 3, 64)).astype(np.float32)
    positions = np.array([0, 1, 77, 4096, 32767], dtype=position_dtype)
    for n_rot, freq_scale in ((64, 1.0), (48, 0.25)):
        want = x.copy()
        cpu.rope(want, positions, n_rot=n_rot, base=10000.0, freq_scale=freq_scale, neox=neox)
        t = on_device(x)
        result = gpu.rope(t, on_device(positions), n_rot=n_rot, base=10000.0, freq_scale=freq_scale, neox=neox)
        assert result is t
        assert relative_error(host(t), want) <= OP_TOLERANCE


# The interpreter's NumPy exp overflows to inf for the large negative gates, as the GPU's does.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_gated_activations():
    rng = np.random.default_rng(3)
    gate = rng.standard_normal((3, 1500)).astype(np.float32) * 6
    up = rng.standard_normal((3, 1500)).astype(np.float32)
    for cpu_op, gpu_op in ((cpu.swiglu, gpu.swiglu), (cpu.geglu, gpu.geglu)):
        got = host(gpu_op(on_device(gate), on_device(up)))
        assert relative_error(got, cpu_op(gate, up)) <= OP_TOLERANCE


def test_softmax_rows_long_short_and_masked():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 9000)).astype(np.float32) * 8
    x[1] = -np.inf
    x[2, :7000] = -np.inf
    got = host(gpu.softmax(on_device(x)))
    assert relative_error(got, cpu.softmax(x)) <= OP_TOLERANCE
    assert np.all(got[1] == 0)
    short = rng.standard_normal((2, 7)).astype(np.float32)
    assert relative_error(host(gpu.softmax(on_device(short))), cpu.softmax(short)) <= OP_TOLERANCE


# --- attention ------------------------------------------------------------------------------------


def _attention_case(kv_dtype, q_pos, k_pos, window=0, n_sink=0, heads=6, kv_heads=2, head_dim=64, seed=0):
    rng = np.random.default_rng(seed)
    n, n_keys = len(q_pos), len(k_pos)
    q = rng.standard_normal((n, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((n_keys, kv_heads, head_dim)).astype(kv_dtype)
    v = rng.standard_normal((n_keys, kv_heads, head_dim)).astype(kv_dtype)
    q_sink = rng.standard_normal(q.shape).astype(np.float32) if n_sink else None
    scale = 1 / np.sqrt(head_dim)
    want = cpu.attention(q, k, v, q_pos, k_pos, scale=scale, window=window, q_sink=q_sink, n_sink=n_sink)
    got = gpu.attention(
        on_device(q),
        on_device(k),
        on_device(v),
        on_device(q_pos),
        on_device(k_pos),
        scale=scale,
        window=window,
        q_sink=None if q_sink is None else on_device(q_sink),
        n_sink=n_sink,
    )
    return host(got), want


KV_DTYPES = [np.float16, np.float32]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["f16", "f32"])
def test_attention_causal_prefill(kv_dtype):
    """A 40-token prefill block after 30 cached tokens: the dot path, several query blocks."""
    q_pos = np.arange(30, 70, dtype=np.int32)
    got, want = _attention_case(kv_dtype, q_pos, np.arange(70, dtype=np.int32))
    assert relative_error(got, want) <= OP_TOLERANCE


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["f16", "f32"])
def test_attention_decode_step_splits_the_keys(kv_dtype):
    got, want = _attention_case(kv_dtype, np.array([299], dtype=np.int64), np.arange(300, dtype=np.int64))
    assert relative_error(got, want) <= OP_TOLERANCE


def test_attention_merges_key_ranges_over_several_steps(monkeypatch):
    """The merge of a split decode step folds its ranges MERGE_TILE at a time."""
    monkeypatch.setattr(importlib.import_module("localllm.kernels.gpu.attention"), "MERGE_TILE", 2)
    got, want = _attention_case(np.float16, np.array([299], dtype=np.int32), np.arange(300, dtype=np.int32))
    assert relative_error(got, want) <= OP_TOLERANCE


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["f16", "f32"])
def test_attention_sliding_window_over_unsorted_slots(kv_dtype):
    rng = np.random.default_rng(9)
    k_pos = rng.permutation(120).astype(np.int32)
    for q_pos in (np.arange(100, 120, dtype=np.int32), np.array([119], dtype=np.int32)):
        got, want = _attention_case(kv_dtype, q_pos, k_pos, window=33)
        assert relative_error(got, want) <= OP_TOLERANCE


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["f16", "f32"])
def test_attention_sinks_then_a_window_with_a_gap(kv_dtype):
    """A streaming cache: 4 sinks at positions 0..3, then positions 500..519 and 530..559."""
    k_pos = np.concatenate([np.arange(4), np.arange(500, 520), np.arange(530, 560)]).astype(np.int32)
    for q_pos in (np.arange(550, 560, dtype=np.int32), np.array([560], dtype=np.int32)):
        got, want = _attention_case(kv_dtype, q_pos, k_pos, window=40, n_sink=4)
        assert relative_error(got, want) <= OP_TOLERANCE


def test_attention_query_that_sees_nothing_gets_zeros():
    got, want = _attention_case(np.float32, np.array([5, 50], dtype=np.int32), np.arange(10, 20, dtype=np.int32))
    assert np.all(got[0] == 0)
    assert relative_error(got, want) <= OP_TOLERANCE


def test_attention_other_group_sizes_and_head_dims():
    for heads, kv_heads, head_dim, n in ((4, 4, 128, 1), (8, 1, 80, 3), (4, 2, 32, 20)):
        q_pos = np.arange(60 - n, 60, dtype=np.int32)
        got, want = _attention_case(np.float16, q_pos, np.arange(60, dtype=np.int32), 0, 0, heads, kv_heads, head_dim)
        assert relative_error(got, want) <= OP_TOLERANCE, (heads, kv_heads, head_dim, n)


# --- errors ---------------------------------------------------------------------------------------


def test_unsupported_type_is_a_kernel_error_naming_it():
    with pytest.raises(KernelError, match="Q2_K"):
        gpu.CheckedWeight(random_weight(Q.Q2_K, 2, 1), device=DEVICE)


def test_bad_arguments_are_kernel_errors():
    weight = gpu.CheckedWeight(random_weight(Q.Q4_0, 4, 2), device=DEVICE)
    x = torch.zeros(64, dtype=torch.float32, device=DEVICE)
    bad = [
        (lambda: gpu.matvec(weight, torch.zeros(32, dtype=torch.float32, device=DEVICE)), "columns"),
        (lambda: gpu.matvec(weight, x.double()), "float32"),
        (lambda: gpu.matvec(random_weight(Q.Q4_0, 4, 2), x), "CheckedWeight"),
        (lambda: gpu.matmul(weight, torch.zeros((3, 64), device=DEVICE).t().contiguous().t()), "contiguous"),
        (lambda: gpu.matmul(weight, torch.zeros((0, 64), device=DEVICE)), "at least one"),
        (lambda: gpu.matmul(weight, np.zeros((2, 64), dtype=np.float32)), "torch tensor"),
        (lambda: gpu.embed(weight, [4]), "out of range"),
        (lambda: gpu.rms_norm(torch.zeros((2, 8), device=DEVICE), torch.ones(4, device=DEVICE), 1e-6), "weight"),
        (
            lambda: gpu.rope(
                torch.zeros((2, 1, 8), device=DEVICE),
                torch.zeros(2, dtype=torch.int32, device=DEVICE),
                n_rot=3,
                base=1e4,
                neox=False,
            ),
            "n_rot",
        ),
        (lambda: gpu.swiglu(torch.zeros((2, 8), device=DEVICE), torch.zeros((2, 4), device=DEVICE)), "same shape"),
        (lambda: gpu.softmax(torch.zeros(8, device=DEVICE)), "2-D"),
    ]
    q = torch.zeros((1, 4, 16), device=DEVICE)
    kv = torch.zeros((3, 2, 16), dtype=torch.float16, device=DEVICE)
    pos = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    k_pos = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    bad += [
        (lambda: gpu.attention(q, kv, kv.float(), pos, k_pos, scale=1.0), "same dtype"),
        (
            lambda: gpu.attention(q, kv[:, :, :8].contiguous(), kv[:, :, :8].contiguous(), pos, k_pos, scale=1.0),
            "head_dim",
        ),
        (lambda: gpu.attention(torch.zeros((1, 3, 16), device=DEVICE), kv, kv, pos, k_pos, scale=1.0), "multiple"),
        (lambda: gpu.attention(q, kv, kv, pos, k_pos[:2], scale=1.0), "k_pos"),
        (lambda: gpu.attention(q, kv, kv, pos.float(), k_pos, scale=1.0), "q_pos"),
        (lambda: gpu.attention(q, kv, kv, pos, k_pos, scale=1.0, n_sink=1), "q_sink"),
        (lambda: gpu.attention(q, kv, kv, pos, k_pos, scale=1.0, window=-1), "window"),
    ]
    for call, message in bad:
        with pytest.raises(KernelError, match=message):
            call()
