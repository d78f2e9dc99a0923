import json
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from localllm import GGUFError
from localllm.formats import quants
from localllm.formats.gguf import open_gguf

from conftest import model_params

SYNTHETIC_ALIGNMENT = 64
SYNTHETIC_STRINGS = ["", "plain", "h\u00e9llo \u4e16\u754c", "nul\x00inside", "\u0120tok"]


def random_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType, n_blocks: int) -> np.ndarray:
    """Random block bytes with every float16 scale field replaced by a finite value."""
    layout = quants.LAYOUTS[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, layout.type_size), dtype=np.uint8)
    for field in layout.scale_fields:
        scales = (rng.standard_normal(n_blocks) * 4).astype(np.float16)
        blocks[:, field.offset : field.offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def synthetic_tensors(seed: int = 0) -> dict[str, tuple[GGMLQuantizationType, tuple[int, ...], np.ndarray]]:
    """One small tensor per supported type (2-D), plus 1-, 3- and 4-D ones: name -> (type, ne, bytes)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for qtype, layout in quants.LAYOUTS.items():
        ne = (2 * layout.block_size, 3)
        tensors[f"w.{qtype.name.lower()}"] = (qtype, ne, random_blocks(rng, qtype, 6))
    tensors["norm.f32"] = (GGMLQuantizationType.F32, (5,), random_blocks(rng, GGMLQuantizationType.F32, 5))
    tensors["cube.q8_0"] = (GGMLQuantizationType.Q8_0, (32, 2, 3), random_blocks(rng, GGMLQuantizationType.Q8_0, 6))
    tensors["hyper.f16"] = (GGMLQuantizationType.F16, (2, 1, 3, 2), random_blocks(rng, GGMLQuantizationType.F16, 12))
    return tensors


def write_synthetic_gguf(path, seed: int = 0) -> dict:
    """A small model file holding every metadata value type and every supported tensor type."""
    writer = GGUFWriter(path, arch="synthetic")
    writer.add_custom_alignment(SYNTHETIC_ALIGNMENT)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float32("t.f32", 0.1)
    writer.add_float64("t.f64", -1.25e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "caf\u00e9 \U0001f600")
    writer.add_array("t.strings", SYNTHETIC_STRINGS)
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.5])
    writer.add_array("t.bools", [True, False, True])
    writer.add_array("t.nested", [[1, 2], [3]])
    tensors = synthetic_tensors(seed)
    for name, (qtype, ne, data) in tensors.items():
        byte_shape = (*reversed(ne[1:]), quants.row_nbytes(qtype, ne[0]))
        writer.add_tensor(name, data.reshape(byte_shape), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "synthetic.gguf"
    tensors = write_synthetic_gguf(path)
    return path, tensors


def reader_value(field):
    """A metadata value as gguf-py's reader decodes it, in the shape open_gguf returns."""
    value = field.contents()
    if field.types[0] == GGUFValueType.ARRAY and field.types[-1] != GGUFValueType.STRING and len(field.types) == 2:
        return np.asarray(value)
    return value


def assert_metadata_matches_reader(g, reader):
    reader_fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(g.metadata) == list(reader_fields)
    for key, field in reader_fields.items():
        mine, theirs = g.metadata[key], reader_value(field)
        if isinstance(theirs, np.ndarray):
            assert isinstance(mine, np.ndarray) and mine.ndim == 1, key
            np.testing.assert_array_equal(mine, theirs.astype(mine.dtype), err_msg=key)
        elif isinstance(mine, list) and mine and isinstance(mine[0], np.ndarray):
            # gguf-py's reader flattens arrays of arrays.
            assert [v for m in mine for v in m.tolist()] == theirs, key
        else:
            assert mine == theirs, key
            assert type(mine) is type(theirs), key


@pytest.mark.slow
@pytest.mark.parametrize("name", model_params())
def test_real_model_header_matches_gguf_reader(model_path, name):
    """Slow even for the small model: gguf-py's reader takes seconds on a 49k-token vocabulary."""
    path = model_path(name)
    reader = GGUFReader(path)
    with open_gguf(path) as g:
        assert g.path == path
        assert g.version == reader.fields["GGUF.version"].contents()
        assert g.data_offset == reader.data_offset
        assert g.alignment == reader.alignment
        assert g.architecture == reader.fields["general.architecture"].contents()
        assert_metadata_matches_reader(g, reader)
        assert list(g.tensors) == [t.name for t in reader.tensors]
        for rt in reader.tensors:
            t = g.tensor(rt.name)
            assert rt.name in g.tensors
            assert t.type == rt.tensor_type
            assert t.ne == tuple(int(d) for d in rt.shape)
            assert t.shape == tuple(reversed(t.ne))
            assert t.nbytes == rt.n_bytes
            assert t.file_offset == rt.data_offset
            assert t.raw.shape[0] == int(np.prod(t.ne[1:]))
            np.testing.assert_array_equal(t.raw.reshape(-1), rt.data.reshape(-1).view(np.uint8))


def test_real_model_directory_is_consistent(model_path):
    from conftest import load_reference

    with open_gguf(model_path("smollm2-135m-instruct")) as g:
        md = g.metadata
        n_vocab = load_reference("smollm2-135m-instruct")["n_vocab"]
        assert len(md["tokenizer.ggml.tokens"]) == n_vocab
        assert all(isinstance(token, str) for token in md["tokenizer.ggml.tokens"])
        assert md["tokenizer.ggml.token_type"].shape == (n_vocab,)
        assert all(" " in merge for merge in md["tokenizer.ggml.merges"])
        embd = g.tensor("token_embd.weight")
        assert embd.shape == (n_vocab, md["llama.embedding_length"])
        assert sum(1 for name in g.tensors if name.endswith("attn_q.weight")) == md["llama.block_count"]
        assert g.data_offset % g.alignment == 0
        ordered = sorted(g.tensors.values(), key=lambda t: t.offset)
        for before, after in zip(ordered, ordered[1:]):
            assert before.offset + before.nbytes <= after.offset
        assert ordered[-1].file_offset + ordered[-1].nbytes <= g.path.stat().st_size


def test_tensors_are_read_only_zero_copy_views(model_path):
    path = model_path("smollm2-135m-instruct")
    with open_gguf(path) as g:
        t = next(iter(g.tensors.values()))
        raw = t.raw
        assert raw.dtype == np.uint8 and raw.ndim == 2
        assert not raw.flags.owndata and not raw.flags.writeable
        assert np.shares_memory(raw, g.tensor(t.name).raw)
        with pytest.raises(ValueError):
            raw[0, 0] = 1
        with open(path, "rb") as f:
            f.seek(t.file_offset)
            assert f.read(64) == raw.reshape(-1)[:64].tobytes()


def test_synthetic_file_round_trips_every_value_and_tensor_type(synthetic):
    path, tensors = synthetic
    g = open_gguf(path)
    assert g.alignment == SYNTHETIC_ALIGNMENT
    assert g.data_offset % SYNTHETIC_ALIGNMENT == 0
    assert g.architecture == "synthetic"
    md = g.metadata
    assert (md["t.u8"], md["t.i8"], md["t.u16"], md["t.i16"]) == (200, -100, 60000, -30000)
    assert (md["t.u32"], md["t.i32"], md["t.u64"], md["t.i64"]) == (4_000_000_000, -2_000_000_000, 2**63 + 5, -(2**62))
    assert md["t.f32"] == float(np.float32(0.1)) and md["t.f64"] == -1.25e-300
    assert md["t.bool"] is True
    assert md["t.str"] == "caf\u00e9 \U0001f600"
    assert md["t.strings"] == SYNTHETIC_STRINGS
    assert md["t.ints"].tolist() == [1, -2, 3]
    assert md["t.floats"].tolist() == [0.5, -1.5]
    assert md["t.bools"].tolist() == [True, False, True]
    assert [a.tolist() for a in md["t.nested"]] == [[1, 2], [3]]
    assert_metadata_matches_reader(g, GGUFReader(path))
    assert list(g.tensors) == list(tensors)
    for name, (qtype, ne, data) in tensors.items():
        t = g.tensor(name)
        assert (t.type, t.ne, t.shape) == (qtype, ne, tuple(reversed(ne)))
        assert t.raw.tobytes() == data.tobytes()
        assert t.file_offset % SYNTHETIC_ALIGNMENT == 0
        values = t.dequantize()
        assert values.dtype == np.float32 and values.shape == t.shape
        reference = gguf.quants.dequantize(t.raw, qtype).reshape(t.shape)
        assert np.array_equal(values, reference, equal_nan=True), name
    g.close()


def mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


def test_close_unmaps_the_file(synthetic):
    path, _ = synthetic
    with open_gguf(path) as g:
        t = g.tensor("w.q4_0")
        assert t.dequantize().shape == t.shape
        assert mapped(path)
        metadata = g.metadata
    assert not mapped(path)
    assert metadata["t.ints"].tolist() == [1, -2, 3]
    with pytest.raises(GGUFError, match="closed"):
        _ = t.raw
    g.close()


def test_close_keeps_views_handed_out_valid(synthetic):
    path, tensors = synthetic
    g = open_gguf(path)
    raw = g.tensor("w.q8_0").raw
    g.close()
    assert raw.tobytes() == tensors["w.q8_0"][2].tobytes()
    del raw


def test_missing_tensor_is_named(synthetic):
    path, _ = synthetic
    with open_gguf(path) as g:
        assert "nope" not in g.tensors
        with pytest.raises(GGUFError, match=r"no tensor named 'nope'"):
            g.tensor("nope")


# ---------------------------------------------------------------- error messages


def field_offsets(path) -> dict:
    """Byte offsets of some header fields of `path`, found with gguf-py's reader."""
    reader = GGUFReader(path)
    offsets = {}
    for key, field in reader.fields.items():
        starts = np.cumsum([0] + [p.nbytes for p in field.parts]) + field.offset
        offsets[key] = {"start": field.offset, "parts": starts.tolist()}
    for tensor in reader.tensors:
        starts = np.cumsum([0] + [p.nbytes for p in tensor.field.parts]) + tensor.field.offset
        offsets[tensor.name] = {"start": tensor.field.offset, "parts": starts.tolist()}
    return offsets


def corrupt(src, dst, offset: int, payload: bytes):
    data = bytearray(src.read_bytes())
    data[offset : offset + len(payload)] = payload
    dst.write_bytes(bytes(data))
    return dst


def expect_error(path, *fragments):
    with pytest.raises(GGUFError) as info:
        open_gguf(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_error_messages_name_file_and_field(synthetic, tmp_path):
    src, _ = synthetic
    offsets = field_offsets(src)
    u32, u64 = struct.Struct("<I").pack, struct.Struct("<Q").pack
    # Tensor info parts: name length, name, n_dims, dims, type, offset.
    q4k = offsets["w.q4_k"]["parts"]
    q8 = offsets["w.q8_0"]["parts"]
    expect_error(corrupt(src, tmp_path / "magic.gguf", 0, b"GGUX"), "magic")
    expect_error(corrupt(src, tmp_path / "version.gguf", 4, u32(7)), "version", "7")
    expect_error(corrupt(src, tmp_path / "type.gguf", q4k[4], u32(200)), "tensor 'w.q4_k'", "unknown tensor type 200")
    expect_error(
        corrupt(src, tmp_path / "iq.gguf", q4k[4], u32(GGMLQuantizationType.IQ2_XXS)), "tensor 'w.q4_k'", "IQ2_XXS"
    )
    expect_error(corrupt(src, tmp_path / "ndims.gguf", q8[2], u32(5)), "tensor 'w.q8_0'", "n_dims")
    expect_error(corrupt(src, tmp_path / "dim0.gguf", q8[3], u64(0)), "tensor 'w.q8_0'", "dimension 0")
    expect_error(corrupt(src, tmp_path / "block.gguf", q8[3], u64(33)), "tensor 'w.q8_0'", "block size 32")
    expect_error(corrupt(src, tmp_path / "align.gguf", q8[5], u64(1)), "tensor 'w.q8_0'", "alignment")
    expect_error(corrupt(src, tmp_path / "past.gguf", q8[5], u64(2**40)), "tensor 'w.q8_0'", "past the end")
    name_start = offsets["w.q8_0"]["parts"][1]
    expect_error(corrupt(src, tmp_path / "dup.gguf", name_start, b"w.q4_0"), "tensor 'w.q4_0'", "duplicate")
    strings = offsets["t.strings"]["parts"]
    expect_error(corrupt(src, tmp_path / "count.gguf", strings[4], u64(2**60)), "'t.strings'", "strings")
    # parts: key length, key, type, element type, count, then (length, bytes) per string.
    expect_error(corrupt(src, tmp_path / "strlen.gguf", strings[7], u64(2**62)), "'t.strings'", "string 1 of 5")
    vtype = offsets["t.str"]["parts"][2]
    expect_error(corrupt(src, tmp_path / "vtype.gguf", vtype, u32(13)), "'t.str'", "value type 13")
    alignment_value = offsets["general.alignment"]["parts"][3]
    expect_error(corrupt(src, tmp_path / "alignv.gguf", alignment_value, u32(48)), "general.alignment", "power of two")


def test_truncated_real_model_names_first_tensor_past_the_end(model_path, tmp_path):
    src = model_path("smollm2-135m-instruct")
    with open_gguf(src) as g:
        cut = g.data_offset + 1000
        first_cut = next(t for t in g.tensors.values() if t.file_offset + t.nbytes > cut)
    with open(src, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(cut))
    expect_error(tmp_path / "cut.gguf", f"tensor '{first_cut.name}'", "past the end")
    with open(src, "rb") as f:
        (tmp_path / "header.gguf").write_bytes(f.read(100_000))
    expect_error(tmp_path / "header.gguf", "'tokenizer.ggml.", "past the end")


def test_unusable_paths(tmp_path):
    expect_error(tmp_path / "absent.gguf", "no such file")
    expect_error(tmp_path, "directory")
    (tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(tmp_path / "empty.gguf", "too short")
    (tmp_path / "text.gguf").write_bytes(b"hello, this is not a model file at all")
    expect_error(tmp_path / "text.gguf", "magic")


# ---------------------------------------------------------------- speed and memory

OPEN_PROBE = r"""
import json, os, sys, time
from localllm.formats.gguf import open_gguf

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

path = sys.argv[1]
open_gguf(path).close()  # warm the page cache and numpy's lazy imports
before = rss()
start_cpu, start_wall = time.process_time(), time.perf_counter()
kept = open_gguf(path)
cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
growth = rss() - before
best_cpu = cpu
for _ in range(2):
    t = time.process_time()
    open_gguf(path).close()
    best_cpu = min(best_cpu, time.process_time() - t)
print(json.dumps({"cpu": best_cpu, "wall": wall, "rss_growth": growth, "tensors": len(kept.tensors)}))
"""


@pytest.mark.slow
def test_open_large_model_is_fast_and_reads_no_tensor_data(model_path):
    path = model_path("qwen2.5-coder-1.5b-instruct")
    out = subprocess.run([sys.executable, "-c", OPEN_PROBE, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tensors"] > 300
    # CPU time, best of three: the shared test machine inflates wall-clock time at random.
    assert result["cpu"] < 0.5, result
    assert result["rss_growth"] < 50 * 2**20, result


def test_hand_built_hostile_headers(tmp_path):
    header = struct.Struct("<IIQQ")

    def kv_file(name: str, body: bytes, version: int = 3, n_kv: int = 1):
        path = tmp_path / name
        path.write_bytes(header.pack(gguf.GGUF_MAGIC, version, 0, n_kv) + body)
        return path

    key = struct.pack("<Q", 1) + b"k"
    deep = key + struct.pack("<I", GGUFValueType.ARRAY) + struct.pack("<IQ", GGUFValueType.ARRAY, 1) * 100_000
    expect_error(kv_file("deep.gguf", deep), "metadata key 'k'", "nested")
    huge = key + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.UINT64, 2**60)
    expect_error(kv_file("huge.gguf", huge), "metadata key 'k'", f"array of {2**60} UINT64")
    bad_bool = key + struct.pack("<IB", GGUFValueType.BOOL, 2)
    expect_error(kv_file("bool.gguf", bad_bool), "metadata key 'k'", "bool value 2")
    bad_utf8 = key + struct.pack("<IQ", GGUFValueType.STRING, 2) + b"\xff\xfe"
    expect_error(kv_file("utf8.gguf", bad_utf8), "metadata key 'k'", "not valid UTF-8")
    twice = key + struct.pack("<IB", GGUFValueType.UINT8, 1)
    expect_error(kv_file("twice.gguf", twice * 2, n_kv=2), "metadata key 'k'", "duplicate key")
    expect_error(kv_file("bigendian.gguf", b"", version=0x03000000, n_kv=0), "big-endian")
    expect_error(kv_file("v1.gguf", b"", version=1, n_kv=0), "version 1 is not supported")
    with open_gguf(kv_file("empty-ok.gguf", b"", n_kv=0)) as g:
        assert g.metadata == {} and g.tensors == {} and g.architecture is None
