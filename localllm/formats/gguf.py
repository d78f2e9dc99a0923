"""Validated, memory-mapped access to GGUF files.

`open_gguf(path)` parses the header (metadata and tensor directory) with bounds checks on
every read, validates every tensor against the file before anything touches tensor data,
and exposes tensors as zero-copy uint8 views of a read-only map. Anything malformed raises
`GGUFError` naming the file, the field or tensor, and the problem.
"""

from __future__ import annotations

import mmap
import os
import struct
from array import array
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from localllm.errors import GGUFError
from localllm.formats import quants

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
# Arrays of arrays are legal but nothing real nests deeply; the cap keeps hostile files from
# driving the recursion into Python's stack limit.
MAX_ARRAY_NESTING = 8
ALIGNMENT_KEY = "general.alignment"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<IIQQ")

_SCALAR_FORMATS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<B"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_ARRAY_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("u1"),
    GGUFValueType.INT8: np.dtype("i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
# Smallest encodings, used to reject element counts the rest of the file cannot hold
# before looping over them.
_MIN_STRING_BYTES = 8
_MIN_ARRAY_BYTES = 12
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8


class Tensor:
    """One tensor of an open GGUF file; its data stays in the file's map until asked for."""

    __slots__ = ("_file", "name", "type", "ne", "shape", "offset", "nbytes", "_rows", "_row_nbytes")

    def __init__(self, file: GGUFFile, name: str, qtype: GGMLQuantizationType, ne: tuple[int, ...], offset: int):
        self._file = file
        self.name = name
        self.type = qtype
        self.ne = ne
        self.shape = tuple(reversed(ne))
        self.offset = offset
        self._rows = 1
        for dim in ne[1:]:
            self._rows *= dim
        self._row_nbytes = quants.row_nbytes(qtype, ne[0])
        self.nbytes = self._rows * self._row_nbytes

    @property
    def file_offset(self) -> int:
        """Absolute byte offset of the tensor's data in the file."""
        return self._file.data_offset + self.offset

    @property
    def raw(self) -> np.ndarray:
        """Zero-copy uint8 view of the tensor's bytes, shaped (rows, bytes_per_row)."""
        return self._file._view(self.file_offset, self.nbytes).reshape(self._rows, self._row_nbytes)

    def drop_pages(self) -> None:
        """Let this process drop the mapped pages of the tensor's bytes, for data kept in
        another layout; a later read of `raw` faults them in again from the file."""
        self._file.drop_pages(self.file_offset, self.nbytes)

    def dequantize(self) -> np.ndarray:
        """The tensor as float32 of `shape`, bit-exact with gguf.quants.dequantize."""
        return quants.dequantize(self.raw, self.type, self.shape)

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.type.name}, shape={self.shape})"


class GGUFFile:
    """A validated GGUF file: metadata, tensor directory and a read-only map of the data.

    `metadata` maps each key to a Python value: int, float, bool or str for scalars, list[str]
    for string arrays, a 1-D NumPy array (owned copy, little-endian dtype of the stored type)
    for numeric and bool arrays, and a list of those for arrays of arrays. `tensors` keeps
    file order. Closing unmaps the file once no tensor view handed out is still alive.
    """

    def __init__(self, path: Path, mapping: mmap.mmap | None, size: int):
        self.path = path
        self._map = mapping
        self._bytes = np.frombuffer(mapping, dtype=np.uint8) if mapping is not None else None
        self._size = size
        self.version = 0
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        self.data_offset = 0
        self.metadata: dict[str, object] = {}
        self.tensors: dict[str, Tensor] = {}

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def _view(self, start: int, nbytes: int) -> np.ndarray:
        if self._bytes is None:
            raise GGUFError(f"{self.path}: file is closed")
        return self._bytes[start : start + nbytes]

    def drop_pages(self, start: int, nbytes: int) -> None:
        """madvise(MADV_DONTNEED) over the whole pages of bytes start..start + nbytes: they
        leave this process's resident set (the file's pages stay in the page cache)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, end - first)

    def close(self) -> None:
        """Drop our map; views handed out earlier keep their pages alive until released."""
        self._bytes = None
        mapping, self._map = self._map, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, version={self.version}, tensors={len(self.tensors)})"


class _HeaderParser:
    """Reads the header fields of a mapped GGUF file, checking every read against its end."""

    def __init__(self, path: Path, data: mmap.mmap, size: int):
        self.path = path
        self.data = data
        self.size = size
        self.pos = 0

    def fail(self, where: str, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {where}: {problem}")

    def need(self, nbytes: int, where: str, what: str) -> None:
        if nbytes > self.size - self.pos:
            raise self.fail(
                where,
                f"{what} needs {nbytes} bytes at offset {self.pos}, past the end of the file "
                f"({self.size} bytes; truncated or corrupt)",
            )

    def scalar(self, fmt: struct.Struct, where: str, what: str) -> int | float:
        self.need(fmt.size, where, what)
        (value,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return value

    def u32(self, where: str, what: str) -> int:
        return self.scalar(_U32, where, what)

    def u64(self, where: str, what: str) -> int:
        return self.scalar(_U64, where, what)

    def string(self, where: str, what: str) -> str:
        length = self.u64(where, f"{what} length")
        self.need(length, where, f"{what} of {length} bytes")
        start = self.pos
        self.pos += length
        try:
            return self.data[start : self.pos].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(where, f"{what} at offset {start} is not valid UTF-8 ({exc.reason})") from None

    def value_type(self, where: str, what: str) -> GGUFValueType:
        raw = self.u32(where, what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(where, f"unknown {what} {raw} at offset {self.pos - 4}") from None

    def value(self, vtype: GGUFValueType, where: str, depth: int = 0):
        if vtype == GGUFValueType.STRING:
            return self.string(where, "string")
        if vtype == GGUFValueType.ARRAY:
            return self.array(where, depth + 1)
        value = self.scalar(_SCALAR_FORMATS[vtype], where, f"{vtype.name} value")
        if vtype == GGUFValueType.BOOL:
            if value > 1:
                raise self.fail(where, f"bool value {value} at offset {self.pos - 1} is not 0 or 1")
            return bool(value)
        return value

    def array(self, where: str, depth: int):
        if depth > MAX_ARRAY_NESTING:
            raise self.fail(where, f"arrays nested more than {MAX_ARRAY_NESTING} deep")
        etype = self.value_type(where, "array element type")
        count = self.u64(where, "array length")
        if etype == GGUFValueType.STRING:
            return self.string_array(count, where)
        if etype == GGUFValueType.ARRAY:
            self.need(count * _MIN_ARRAY_BYTES, where, f"array of {count} arrays")
            return [self.array(where, depth + 1) for _ in range(count)]
        dtype = _ARRAY_DTYPES[etype]
        self.need(count * dtype.itemsize, where, f"array of {count} {etype.name}")
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        if etype == GGUFValueType.BOOL:
            if count and values.max() > 1:
                raise self.fail(where, "bool array holds a value other than 0 or 1")
            return values.astype(bool)
        return values

    def past_end(self, where: str, index: int, count: int, length_fields: array) -> GGUFError:
        offset = length_fields[index]
        return self.fail(where, f"string {index} of {count} at offset {offset} runs past the end of the file")

    def string_array(self, count: int, where: str) -> list[str]:
        self.need(count * _MIN_STRING_BYTES, where, f"array of {count} strings")
        if count == 0:
            return []
        # Opening a model is dominated by its ~150k vocabulary strings and ~150k merges, so
        # the Python loop only chases length fields; decoding happens in one bulk call.
        data, unpack = self.data, _U64.unpack_from
        base = pos = self.pos
        # Grown as the walk proceeds, so a bogus count costs only what the file really holds.
        length_fields = array("q")
        record = length_fields.append
        i = 0
        try:
            for i in range(count):  # noqa: B007 (the error path below reports the failing i)
                record(pos)
                pos += 8 + unpack(data, pos)[0]
        except (struct.error, OverflowError):
            # Either this length field is cut off, or the previous string overshot the end.
            raise self.past_end(where, i - 1 if i > 0 and pos > self.size else i, count, length_fields) from None
        if pos > self.size:
            raise self.past_end(where, i, count, length_fields)
        self.pos = pos
        starts = np.frombuffer(length_fields, dtype=np.int64) - base
        region = np.frombuffer(data, dtype=np.uint8, count=pos - base, offset=base).copy()
        # Turn each 8-byte length field into a single NUL separator and drop the other 7 bytes.
        region[starts] = 0
        keep = np.ones(region.size, dtype=bool)
        for k in range(1, 8):
            keep[starts + k] = False
        try:
            strings = region[keep].tobytes().decode("utf-8").split("\0")[1:]
        except UnicodeDecodeError:
            strings = []
        if len(strings) == count:
            return strings
        # A string holds a NUL or invalid UTF-8: decode one by one to keep or name it.
        ends = np.append(starts[1:], pos - base)
        strings = []
        for index, (start, end) in enumerate(zip(starts.tolist(), ends.tolist())):
            try:
                strings.append(data[base + start + 8 : base + end].decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise self.fail(
                    where, f"string {index} at offset {base + start + 8} is not valid UTF-8 ({exc.reason})"
                ) from None
        return strings


def _open_map(path: Path) -> tuple[mmap.mmap | None, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return None, 0
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, not a GGUF file") from None
    except OSError as exc:
        raise GGUFError(f"{path}: cannot open: {exc.strerror or exc}") from None


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open, map and validate a GGUF file. Raises GGUFError on anything malformed."""
    path = Path(path)
    mapping, size = _open_map(path)
    file = GGUFFile(path, mapping, size)
    try:
        _parse(file, mapping, size)
    except GGUFError:
        file.metadata.clear()
        file.close()
        raise
    except Exception as exc:
        file.metadata.clear()
        file.close()
        raise GGUFError(f"{path}: unreadable GGUF header: {type(exc).__name__}: {exc}") from exc
    # Numeric arrays were parsed as views of the map so that a bogus count could not allocate;
    # now that the header is valid, own them so that close() can unmap the file.
    for key, value in file.metadata.items():
        file.metadata[key] = _detached(value)
    return file


def _detached(value):
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, list) and value and not isinstance(value[0], str):
        return [_detached(item) for item in value]
    return value


def _parse(file: GGUFFile, mapping: mmap.mmap | None, size: int) -> None:
    path = file.path
    if size < _HEADER.size:
        raise GGUFError(f"{path}: header: file is {size} bytes, too short for a GGUF header")
    magic, version, n_tensors, n_kv = _HEADER.unpack_from(mapping, 0)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: magic: expected b'GGUF', found {mapping[0:4]!r}; not a GGUF file")
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise GGUFError(f"{path}: version: big-endian GGUF files are not supported")
        raise GGUFError(f"{path}: version: GGUF version {version} is not supported (only 2 and 3)")
    file.version = version
    parser = _HeaderParser(path, mapping, size)
    parser.pos = _HEADER.size

    parser.need(n_kv * _MIN_KV_BYTES, "metadata count", f"{n_kv} metadata entries")
    metadata = file.metadata
    for index in range(n_kv):
        key = parser.string(f"metadata entry {index}", "key")
        if key in metadata:
            raise parser.fail(f"metadata key {key!r}", "duplicate key")
        where = f"metadata key {key!r}"
        vtype = parser.value_type(where, "value type")
        metadata[key] = parser.value(vtype, where)

    if ALIGNMENT_KEY in metadata:
        alignment = metadata[ALIGNMENT_KEY]
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{path}: metadata key {ALIGNMENT_KEY!r}: {alignment!r} is not a positive power of two")
        file.alignment = alignment

    parser.need(n_tensors * _MIN_TENSOR_INFO_BYTES, "tensor count", f"{n_tensors} tensor infos")
    infos = []
    for index in range(n_tensors):
        name = parser.string(f"tensor info {index}", "name")
        infos.append(_read_tensor_info(parser, name))
    file.data_offset = -(-parser.pos // file.alignment) * file.alignment

    tensors = file.tensors
    for name, qtype, ne, offset in infos:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r}: duplicate tensor name")
        tensors[name] = tensor = Tensor(file, name, qtype, ne, offset)
        if offset % file.alignment:
            raise GGUFError(
                f"{path}: tensor {name!r}: data offset {offset} is not a multiple of the alignment {file.alignment}"
            )
        end = file.data_offset + offset + tensor.nbytes
        if end > size:
            raise GGUFError(
                f"{path}: tensor {name!r}: data [{file.data_offset + offset}, {end}) extends past the end "
                f"of the file ({size} bytes; truncated?)"
            )
    previous = None
    for tensor in sorted(tensors.values(), key=lambda t: t.offset):
        if previous is not None and tensor.offset < previous.offset + previous.nbytes:
            raise GGUFError(f"{path}: tensor {tensor.name!r}: data overlaps tensor {previous.name!r}")
        previous = tensor


def _read_tensor_info(parser: _HeaderParser, name: str) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
    where = f"tensor {name!r}"
    n_dims = parser.u32(where, "n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise parser.fail(where, f"n_dims is {n_dims}, must be 1..{MAX_DIMS}")
    ne = tuple(parser.u64(where, f"dimension {i}") for i in range(n_dims))
    for i, dim in enumerate(ne):
        if not 0 < dim < 2**63:
            raise parser.fail(where, f"dimension {i} is {dim}, must be positive")
    raw_type = parser.u32(where, "type")
    offset = parser.u64(where, "data offset")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise parser.fail(where, f"unknown tensor type {raw_type}") from None
    if qtype not in quants.SUPPORTED_TYPES:
        raise parser.fail(where, f"tensor type {qtype.name} is not supported")
    block_size = GGML_QUANT_SIZES[qtype][0]
    if ne[0] % block_size:
        raise parser.fail(where, f"dimension 0 is {ne[0]}, not a multiple of the {qtype.name} block size {block_size}")
    return name, qtype, ne, offset
