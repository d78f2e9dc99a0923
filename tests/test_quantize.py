"""`localllm quantize`: llama-quantize's tensor choices and bytes.

References: the ternary files' per-tensor types and sha256 come from llama.cpp's own
llama-quantize (tests/data/reference/qwen2.5-coder-1.5b-tq*_0.json, recipe inside); the legacy
formats are checked against the gguf package (its NumPy dequantizer and quantizer), which
reproduce ggml's reference quantization; the K-quant encoders' bytes and the Q4_K_M and Q6_K
files come from llama.cpp itself (tests/data/kquants/, made by make_reference.py there)."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants
from test_cli_errors import needs_mounts

from localllm.errors import InvalidParameterError, QuantizeError
from localllm.formats.gguf import open_gguf
from localllm.formats.kquant_encoders import quantize_q4_k, quantize_q6_k
from localllm.runtime.llm import LLM
from localllm.runtime.quantize import TARGETS, quantize

from conftest import DATA, REFERENCE
from test_models import MAX_DELTA, MEDIAN_DELTA

Q = GGMLQuantizationType
SMOLLM = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-1.5b-instruct"
KQUANTS = DATA / "kquants"


def assert_quantized_like_gguf(source_path, output_path, target: str):
    """Each weight matrix as gguf.quants encodes gguf.quants' decoding of the source; every
    other tensor and all metadata but the file type carried over unchanged."""
    source, output = open_gguf(source_path), open_gguf(output_path)
    assert set(output.tensors) == set(source.tensors)
    default = TARGETS[target][0]
    converted = 0
    for name, tensor in output.tensors.items():
        original = source.tensors[name]
        assert tensor.shape == original.shape, name
        if tensor.type == original.type:
            assert np.array_equal(tensor.raw, original.raw), name
            continue
        converted += 1
        assert tensor.type == default, name
        values = gguf_quants.dequantize(original.raw, original.type).reshape(-1, original.shape[-1])
        expected = gguf_quants.quantize(values, tensor.type)
        assert np.array_equal(tensor.raw.reshape(expected.shape), expected), name
    assert converted > 0
    changed = {"general.file_type", "general.quantization_version"}
    for key, value in source.metadata.items():
        if key not in changed:
            assert (
                np.array_equal(output.metadata[key], value)
                if isinstance(value, np.ndarray)
                else (output.metadata[key] == value)
            ), key
    assert output.metadata["general.file_type"] == int(TARGETS[target][1])
    assert output.metadata["general.quantization_version"] == 2
    assert output.alignment == source.alignment


@pytest.mark.parametrize(
    "target",
    [pytest.param("Q4_0"), *(pytest.param(t, marks=pytest.mark.slow) for t in ("Q4_1", "Q5_0", "Q5_1", "Q8_0"))],
)
def test_legacy_targets_match_the_gguf_quantizers_and_run(model_path, tmp_path, target):
    source = model_path(SMOLLM)
    if target == "Q4_1":
        # SmolLM2's weights are Q4_1 already: requantize them from a Q8_0 copy instead.
        quantize(source, tmp_path / "smollm2.Q8_0.gguf", "Q8_0")
        source = tmp_path / "smollm2.Q8_0.gguf"
    output = tmp_path / f"smollm2.{target}.gguf"
    reports = []
    plans = quantize(source, output, target, progress=lambda *report: reports.append(report))
    assert_quantized_like_gguf(source, output, target)
    # SmolLM2 ties its head to the embedding, whose 576-value rows are no multiple of 256: Q8_0.
    assert {p.name: p.target for p in plans}["token_embd.weight"] == Q.Q8_0
    assert [(done, n) for done, n, _, _ in reports] == [(i, len(plans)) for i in range(1, len(plans) + 1)]
    written = [w for _, _, w, _ in reports]
    assert written == sorted(written) and written[-1] == reports[-1][3] == sum(p.nbytes for p in plans)
    with LLM(str(output)) as llm:
        logits = llm.logits(llm.tokenize("The capital of France is"))
    assert np.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["TQ2_0", "TQ1_0"])
def test_ternary_files_reproduce_llama_quantize_tensor_by_tensor(model_path, tmp_path, target):
    reference = json.loads((REFERENCE / f"qwen2.5-coder-1.5b-{target.lower()}.json").read_text())["tensor_sha256"]
    output = tmp_path / f"qwen.{target}.gguf"
    quantize(model_path(QWEN), output, target)
    written = open_gguf(output)
    assert list(written.tensors) == list(reference), "tensor order differs from llama-quantize's"
    for name, tensor in written.tensors.items():
        assert [tensor.type.name, hashlib.sha256(tensor.raw.tobytes()).hexdigest()] == reference[name], name
    written.close()
    # The same bytes as llama.cpp's file, so its logits on that file apply: the ternary kernels
    # on a real model, within the catalog models' |delta| tolerances. Not top-1 agreement: the
    # reference has 10 positions of a ternarized (meaningless) model, 3 of them with the top two
    # logits within 0.27 of each other, where either may win.
    cases = json.loads((REFERENCE / f"qwen2.5-coder-1.5b-{target.lower()}.json").read_text())["cases"]
    deltas = []
    with LLM(str(output)) as llm:
        for case in cases:
            for row, top10 in zip(llm.logits(case["tokens"]), case["top10"]):
                ids = [token for token, _ in top10]
                deltas.extend(np.abs(row[ids] - np.array([value for _, value in top10])))
    assert np.median(deltas) <= MEDIAN_DELTA and np.max(deltas) <= MAX_DELTA, (np.median(deltas), np.max(deltas))


@pytest.mark.parametrize("qtype, encode", [("q4_k", quantize_q4_k), ("q6_k", quantize_q6_k)])
def test_k_quant_encoders_reproduce_llama_cpp_bit_for_bit(qtype, encode):
    """Against ggml_quantize_chunk's bytes for rows of every kind make_reference.py makes:
    normal, heavy-tailed, uniform, one-signed, sparse, constant, on a grid of ties, tiny
    (subnormal), huge (overflowing float32 in the fits) and mixed magnitudes."""
    rows, expected = np.load(KQUANTS / "rows.npz"), np.load(KQUANTS / f"rows.{qtype}.npz")
    assert rows.files == expected.files and len(rows.files) >= 10
    for case in rows.files:
        got = encode(rows[case])
        assert got.shape == expected[case].shape, case
        differing = np.flatnonzero((got != expected[case]).any(axis=1))
        assert differing.size == 0, f"{case}: super-blocks {differing.tolist()} differ from llama.cpp's"
    # Rows of several super-blocks, several rows at once: the bytes are the blocks' in order.
    values = rows["normal"].reshape(4, -1)
    assert np.array_equal(encode(values), expected["normal"].reshape(4, -1))


def assert_reproduces_llama_quantize(path, reference_name: str) -> None:
    reference = json.loads((KQUANTS / f"{reference_name}.json").read_text())["tensor_sha256"]
    written = open_gguf(path)
    assert list(written.tensors) == list(reference), "tensor order differs from llama-quantize's"
    for name, tensor in written.tensors.items():
        assert [tensor.type.name, hashlib.sha256(tensor.raw.tobytes()).hexdigest()] == reference[name], name
    written.close()


@pytest.mark.parametrize("target", ["Q4_K_M", pytest.param("Q6_K", marks=pytest.mark.slow)])
def test_k_quant_targets_reproduce_llama_quantize_on_smollm2(model_path, tmp_path, target):
    """SmolLM2's 576-value rows fit no 256-value block, so besides Q4_K and Q6_K (ffn_down,
    Q6_K where `use_more_bits` picks the layer) this covers the fallbacks to Q5_0 and Q8_0."""
    output = tmp_path / f"smollm2.{target}.gguf"
    quantize(model_path(SMOLLM), output, target)
    assert_reproduces_llama_quantize(output, f"smollm2-135m-instruct.{target.lower()}")


def test_a_k_quant_with_no_encoder_is_a_one_line_error(tmp_path):
    """Q4_K_M gives a one-layer Falcon's ffn_down Q5_K, which this tool cannot encode."""
    source = tmp_path / "falcon.gguf"
    writer = GGUFWriter(source, "falcon")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.ffn_down.weight", np.ones((4, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = "^tensor blk.0.ffn_down.weight: Q5_K would have to be encoded from F32, and this quantizer has no Q5_K"
    with pytest.raises(QuantizeError, match=message):
        quantize(source, tmp_path / "out.gguf", "Q4_K_M")
    assert not (tmp_path / "out.gguf").exists()


def write_tiny_model(path, cols: int):
    """A GGUF with one weight matrix whose rows have `cols` values."""
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("blk.0.ffn_up.weight", np.ones((4, cols), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(cols, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    source = tmp_path / "tiny.gguf"
    write_tiny_model(source, cols=48)
    output = tmp_path / "out.gguf"
    with pytest.raises(InvalidParameterError, match="unknown quantization type 'Q3_X'; choose from Q4_0"):
        quantize(source, output, "Q3_X")
    # 48-value rows fit no 32- or 256-value block: the message names the tensor.
    with pytest.raises(QuantizeError, match=r"^tensor blk\.0\.ffn_up\.weight: rows of 48 values fit neither TQ2_0"):
        quantize(source, output, "TQ2_0")
    with pytest.raises(QuantizeError, match="directory .*missing does not exist"):
        quantize(source, tmp_path / "missing" / "out.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_ternary_rows_of_32_fall_back_to_q4_0(tmp_path):
    """As llama-quantize: TQ2_0 needs 256-value rows; 96-value rows become Q4_0; norms stay F32."""
    source = tmp_path / "tiny.gguf"
    write_tiny_model(source, cols=96)
    quantize(source, tmp_path / "out.gguf", "TQ2_0")
    written = open_gguf(tmp_path / "out.gguf")
    assert written.tensors["blk.0.ffn_up.weight"].type == Q.Q4_0
    assert written.tensors["blk.0.ffn_norm.weight"].type == Q.F32
    assert GGML_QUANT_SIZES[Q.Q4_0][0] == 32 and 96 % 32 == 0


@needs_mounts
def test_a_full_disk_leaves_no_partial_output(tmp_path, model_path):
    source = model_path(SMOLLM)
    script = (
        f'mount -t tmpfs -o size=8m tmpfs "{tmp_path}/small"; '
        f'{sys.executable} -c "import sys; from localllm.runtime.quantize import quantize; '
        f"quantize(sys.argv[1], sys.argv[2], 'Q8_0')\" {source} {tmp_path}/small/out.gguf "
        f'|| echo "status $?"; ls -A "{tmp_path}/small"'
    )
    (tmp_path / "small").mkdir()
    result = subprocess.run(["unshare", "-rm", "sh", "-ec", script], capture_output=True, text=True, timeout=300)
    assert "OSError" in result.stderr and "space" in result.stderr, result.stderr[-2000:]
    assert result.stdout.strip().splitlines() == ["status 1"], result.stdout


def test_the_command_line(tmp_path):
    source = tmp_path / "tiny.gguf"
    write_tiny_model(source, cols=256)
    cli = [sys.executable, "-m", "localllm.runtime.cli", "quantize"]
    done = subprocess.run(
        [*cli, str(source), str(tmp_path / "out.gguf"), "--type", "tq1_0"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    # 4 rows of one TQ1_0 block, and the F32 norm.
    assert done.stdout.strip() == f"{tmp_path / 'out.gguf'}: 2 tensors, 1 converted, 1.2 kB of tensor data"
    assert open_gguf(tmp_path / "out.gguf").tensors["blk.0.ffn_up.weight"].type == Q.TQ1_0
    # Progress goes to stderr, a line per tenth of the bytes when stderr is not a terminal.
    assert done.stderr.splitlines()[-1] == "quantize: 2/2 tensors, 1.2 kB of 1.2 kB"
    bad = subprocess.run(
        [*cli, str(source), str(tmp_path / "bad.gguf"), "--type", "Q9"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown quantization type 'Q9'" in bad.stderr
    assert not (tmp_path / "bad.gguf").exists()
