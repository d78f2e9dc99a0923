"""Make the Q4_K / Q6_K reference files in this folder with llama.cpp itself.

Run once, with the interpreter that has llama-cpp-python 0.3.36 (llama.cpp vendored and built):
    /work/llamavenv/bin/python tests/data/kquants/make_reference.py ~/.cache/localllm/models

Writes:
- rows.npz: float32 test rows, (super-blocks, 256) per case, made by `test_rows` below.
- rows.q4_k.npz, rows.q6_k.npz: the same cases as llama.cpp encodes them, from
  `ggml_quantize_chunk(GGML_TYPE_Q4_K or GGML_TYPE_Q6_K, rows, dst, 0, nrows, 256, NULL)` in
  llama_cpp/lib/libggml-base.so, which without an importance matrix runs
  `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref` (ggml/src/ggml-quants.c).
- <model>.<target>.json for each of `JOBS`: `llama_model_quantize` (llama-quantize) of the
  catalog file with allow_requantize, 2 threads and ftype LLAMA_FTYPE_MOSTLY_<TARGET>: every
  tensor's [type, sha256] in the output's order.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
SEED = 20261130
GGML_TYPES = {"q4_k": 12, "q6_k": 14}
FTYPES = {"q4_k_m": 15, "q6_k": 18}  # llama_ftype values, include/llama.h
# (catalog file, model name, target)
JOBS = [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct", "q4_k_m"),
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct", "q6_k"),
]


def test_rows() -> dict[str, np.ndarray]:
    """Rows that exercise each branch of the reference quantizers, 256 values per super-block."""
    rng = np.random.default_rng(SEED)

    def normal(blocks: int, sigma: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((blocks, 256)) * sigma).astype(np.float32)

    sparse = normal(8, 0.02)
    sparse[rng.random(sparse.shape) < 0.6] = 0
    sparse[1, :32] = 0  # a whole Q4_K sub-block
    sparse[2, 16:48] = 0  # two whole Q6_K sub-blocks straddling a Q4_K one
    sparse[3] = 0  # a whole super-block
    sparse[4, ::2] = 0
    constant = np.array([[0.5], [-3.0], [1e-3], [0.0]], dtype=np.float32).repeat(256, axis=1)
    per_group = np.repeat(rng.uniform(-2, 2, (4, 16)), 16, axis=1).astype(np.float32)
    mixed = normal(8) * np.repeat(10.0 ** rng.uniform(-6, 6, (8, 16)), 16, axis=1).astype(np.float32)
    one_spike = normal(4, 1e-3)
    one_spike[:, 100] = 50.0
    return {
        "normal": normal(32, 0.02),
        "heavy_tailed": (rng.standard_t(3, (16, 256)) * 0.02).astype(np.float32),
        "uniform": rng.uniform(-1, 1, (16, 256)).astype(np.float32),
        "positive": rng.uniform(0.5, 1.5, (8, 256)).astype(np.float32),
        "negative": rng.uniform(-2, -1, (8, 256)).astype(np.float32),
        "sparse": sparse,
        "constant": np.concatenate([constant, per_group]),
        # ties for nearest_int: values on a grid of eighths
        "grid": (rng.integers(-8, 8, (8, 256)) / 8).astype(np.float32),
        "one_spike": one_spike,
        "tiny": np.concatenate([normal(4, 1e-20), normal(4, 1e-40)]),
        "huge": np.concatenate([normal(4, 1e10), normal(4, 1e20), normal(4, 1e30)]),
        "mixed_magnitudes": mixed.astype(np.float32),
    }


def ggml_encode(lib, type_id: int, rows: np.ndarray, block_bytes: int) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.zeros((len(rows), block_bytes), dtype=np.uint8)
    size = lib.ggml_quantize_chunk(type_id, rows.ctypes.data, out.ctypes.data, 0, len(rows), rows.shape[1], None)
    assert size == out.nbytes, (size, out.nbytes)
    return out


def tensor_table(path: Path, lib) -> dict[str, list[str]]:
    """name -> [type, sha256 of its bytes], in file order, read with a minimal GGUF parser
    (the llama-cpp-python environment has no gguf package) and ggml's own type sizes."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = np.frombuffer(data, dtype=fmt, count=1, offset=pos)[0]
        pos += np.dtype(fmt).itemsize
        return value

    def string() -> str:
        nonlocal pos
        length = int(take("<u8"))
        pos += length
        return data[pos - length : pos].decode()

    # GGUF value types 0-7 and 10-12 (8 is a string, 9 an array)
    scalars = dict(zip([*range(8), 10, 11, 12], "u1 i1 <u2 <i2 <u4 <i4 <f4 u1 <u8 <i8 <f8".split()))

    def value(kind: int):
        if kind == 8:
            return string()
        if kind == 9:
            item, count = int(take("<u4")), int(take("<u8"))
            return [value(item) for _ in range(count)]
        return take(scalars[kind])

    assert data[:4] == b"GGUF"
    pos = 8
    n_tensors, n_kv = int(take("<u8")), int(take("<u8"))
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(int(take("<u4")))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [int(take("<u8")) for _ in range(int(take("<u4")))]
        infos.append((name, dims, int(take("<u4")), int(take("<u8"))))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-pos // alignment) * alignment
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    table = {}
    for name, dims, kind, offset in infos:
        nbytes = lib.ggml_row_size(kind, dims[0]) * int(np.prod(dims[1:], dtype=np.int64))
        blob = data[start + offset : start + offset + nbytes]
        table[name] = [lib.ggml_type_name(kind).decode().upper(), hashlib.sha256(blob).hexdigest()]
    return table


def main(models: Path) -> None:
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    rows = test_rows()
    np.savez_compressed(HERE / "rows.npz", **rows)
    for name, type_id in GGML_TYPES.items():
        block_bytes = {"q4_k": 144, "q6_k": 210}[name]
        encoded = {case: ggml_encode(ggml, type_id, values, block_bytes) for case, values in rows.items()}
        np.savez_compressed(HERE / f"rows.{name}.npz", **encoded)

    for file_name, model, target in JOBS:
        with tempfile.TemporaryDirectory() as tmp:
            llama_quantize(llama_cpp, models / file_name, Path(tmp) / "out.gguf", target)
            table = tensor_table(Path(tmp) / "out.gguf", ggml)
        recipe = (
            f"llama-quantize --allow-requantize {file_name} OUT {target.upper()} 2 "
            "(llama_model_quantize in llama-cpp-python 0.3.36; tests/data/kquants/make_reference.py)"
        )
        reference = {"model": file_name, "recipe": recipe, "tensor_sha256": table}
        (HERE / f"{model}.{target}.json").write_text(json.dumps(reference, indent=1) + "\n")


def llama_quantize(llama_cpp, source: Path, out: Path, target: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = FTYPES[target]
    params.allow_requantize = True
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    assert status == 0, status


if __name__ == "__main__":
    main(Path(sys.argv[1]).expanduser())
