"""Corrupted GGUF files must be rejected with GGUFError or open cleanly; nothing else.

Cases are made from two bases: the header of a real model plus a little of its data (so most
tensors lie past the end and must fail the extent check), and a small synthetic model with
every metadata value type and tensor type. Each case truncates the file, flips bytes, or
rewrites one header field (found by walking the base's header) with an awkward value.
"""

import struct
import time
from collections import defaultdict

import numpy as np
import pytest
from test_gguf import write_synthetic_gguf

from localllm import GGUFError
from localllm.formats.gguf import open_gguf

PER_CASE_SECONDS = 2.0
REAL_DATA_BYTES = 64 * 1024
_FIXED_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


def header_fields(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """Offsets and widths of the base's header fields, grouped by what they hold."""
    fields = defaultdict(list)
    fields["version"].append((4, 4))
    fields["tensor_count"].append((8, 8))
    fields["metadata_count"].append((16, 8))
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def u(width: int) -> int:
        return int.from_bytes(data[pos : pos + width], "little")

    def string(kind: str) -> bytes:
        nonlocal pos
        length = u(8)
        fields[kind].append((pos, 8))
        pos += 8 + length
        return data[pos - length : pos]

    def value(vtype: int, kind: str) -> None:
        nonlocal pos
        if vtype == STRING:
            string("string_length")
        elif vtype == ARRAY:
            fields["array_element_type"].append((pos, 4))
            etype = u(4)
            pos += 4
            fields["array_length"].append((pos, 8))
            count = u(8)
            pos += 8
            if etype in _FIXED_WIDTH:
                pos += count * _FIXED_WIDTH[etype]
            else:
                for _ in range(count):
                    value(etype, kind)
        else:
            fields[kind].append((pos, _FIXED_WIDTH[vtype]))
            pos += _FIXED_WIDTH[vtype]

    for _ in range(n_kv):
        key = string("key_length")
        fields["value_type"].append((pos, 4))
        vtype = u(4)
        pos += 4
        value(vtype, "alignment" if key == b"general.alignment" else "scalar")
    for _ in range(n_tensors):
        string("tensor_name_length")
        fields["n_dims"].append((pos, 4))
        n_dims = u(4)
        pos += 4
        for _ in range(n_dims):
            fields["dim"].append((pos, 8))
            pos += 8
        fields["tensor_type"].append((pos, 4))
        fields["tensor_offset"].append((pos + 4, 8))
        pos += 12
    fields["header_end"].append((pos, 0))
    return dict(fields)


def awkward_values(width: int, original: int, file_size: int, rng: np.random.Generator) -> list[int]:
    top = 2 ** (8 * width)
    small = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 31, 32, 33, 39, 40, 63, 64, 255, 256]
    large = [2**31, 2**32 - 1, 2**32, 2**60, 2**63 - 1, 2**63, 2**64 - 1, file_size, file_size + 1]
    relative = [original + 1, original - 1, original * 2, original + 32, int(rng.integers(0, 2**63))]
    return [v % top for v in small + large + relative]


class Base:
    def __init__(self, name: str, data: bytes):
        self.name = name
        self.data = data
        self.fields = header_fields(data)
        self.header_end = self.fields.pop("header_end")[0][0]
        self.kinds = sorted(self.fields)


def mutate(base: Base, rng: np.random.Generator) -> tuple[bytes, str]:
    data = bytearray(base.data)
    kind = rng.choice(["truncate", "flip", "field", "field", "field"])
    if kind == "truncate":
        limit = base.header_end + 256 if rng.random() < 0.5 else len(data)
        cut = int(rng.integers(0, min(limit, len(data))))
        return bytes(data[:cut]), f"truncate at {cut}"
    if kind == "flip":
        flips = []
        for _ in range(int(rng.integers(1, 9))):
            if rng.random() < 0.5:
                field_list = base.fields[rng.choice(base.kinds)]
                offset, width = field_list[int(rng.integers(len(field_list)))]
                where = offset + int(rng.integers(max(width, 1)))
            else:
                where = int(rng.integers(len(data)))
            data[where] ^= int(rng.integers(1, 256))
            flips.append(where)
        return bytes(data), f"flip bytes at {flips}"
    field = rng.choice(base.kinds)
    offset, width = base.fields[field][int(rng.integers(len(base.fields[field])))]
    original = int.from_bytes(data[offset : offset + width], "little")
    choices = awkward_values(width, original, len(data), rng)
    new = choices[int(rng.integers(len(choices)))]
    data[offset : offset + width] = new.to_bytes(width, "little")
    return bytes(data), f"set {field} at {offset} from {original} to {new}"


@pytest.fixture(scope="module")
def bases(model_path, tmp_path_factory):
    with open_gguf(model_path("smollm2-135m-instruct")) as g:
        keep = g.data_offset + REAL_DATA_BYTES
    with open(model_path("smollm2-135m-instruct"), "rb") as f:
        real = f.read(keep)
    synthetic_path = tmp_path_factory.mktemp("fuzz") / "synthetic.gguf"
    write_synthetic_gguf(synthetic_path)
    return [Base("smollm2-header", real), Base("synthetic", synthetic_path.read_bytes())]


def check_case(path, description: str) -> str:
    start = time.perf_counter()
    try:
        g = open_gguf(path)
    except GGUFError as exc:
        assert str(path) in str(exc), f"{description}: message does not name the file: {exc}"
        # open_gguf's safety net for unforeseen exceptions must never be what caught a case.
        assert "unreadable GGUF header" not in str(exc), f"{description}: {exc}"
        outcome = "rejected"
    except Exception as exc:
        pytest.fail(f"{description}: {type(exc).__name__} instead of GGUFError: {exc}")
    else:
        with g:
            for t in g.tensors.values():
                values = t.dequantize()
                assert values.shape == t.shape and values.dtype == np.float32, description
        outcome = "opened"
    elapsed = time.perf_counter() - start
    assert elapsed < PER_CASE_SECONDS, f"{description}: took {elapsed:.2f} s"
    return outcome


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "n_cases, seed",
    [pytest.param(200, 1, id="200"), pytest.param(2000, 2, id="2000", marks=pytest.mark.slow)],
)
def test_corrupted_files_are_rejected_or_open_cleanly(bases, tmp_path, n_cases, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "case.gguf"
    outcomes = defaultdict(int)
    for case in range(n_cases):
        # Real-header cases cost ~20x more to parse (49k tokens, 49k merges): one in five.
        base = bases[0] if case % 5 == 0 else bases[1]
        data, what = mutate(base, rng)
        path.write_bytes(data)
        outcome = check_case(path, f"case {case} on {base.name}: {what}")
        outcomes[base.name, outcome] += 1
    assert outcomes["synthetic", "opened"] > 0 and outcomes["synthetic", "rejected"] > 0, dict(outcomes)
    assert outcomes["smollm2-header", "rejected"] > 0, dict(outcomes)


def test_real_header_base_is_rejected_only_for_its_missing_data(bases, tmp_path):
    real = bases[0]
    path = tmp_path / "real.gguf"
    path.write_bytes(real.data)
    with pytest.raises(GGUFError, match="past the end of the file"):
        open_gguf(path)
    assert len(real.fields["dim"]) >= 272 and real.fields["key_length"]
