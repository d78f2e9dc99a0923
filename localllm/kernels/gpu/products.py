"""Weight-times-activation products and embedding lookups straight from GGUF blocks, in Triton.

A weight lives on the device as its raw bytes, uint8 (rows, row_bytes), exactly as the file
stores it: no dequantized copy. Every kernel dequantizes the blocks it reads in registers.

Tiles are built from *units*: each block splits into `units` groups of `lanes` bytes (the bytes
of its packed weights that one load fetches) and each byte yields `planes` weights (nibbles,
2-bit crumbs, ...). A tile of weights is then indexed by (row, unit, lane) for one plane, and the
per-block or per-sub-block fields (scales, mins, high bits) are loaded once per (row, unit) and
broadcast over the lanes, so that decoding stays one load per packed byte. The column a (unit,
lane, plane) weight multiplies is computed alongside, and the activations are gathered in that
order: no weight is ever moved into natural column order.

- matvec (decode, and matmul up to MATVEC_MAX_ROWS activation rows): each program takes a few
  rows and streams their units once, each dequantized tile multiplying every activation row;
  products accumulate in float32 registers and are summed once at the end.
- matmul (more rows: prefill): a (rows x unit-lanes) tile of weights is dequantized in registers
  and fed to `tl.dot` against the gathered activation tile, float32 accumulation. The inputs are
  float32 and the dot runs as "tf32x3" (three tensor-core TF32 products, about float32 accuracy).
- embed: dequantizes whole rows, stored in natural column order.

Activations stay float32: the GPU never rounds them to 8 bits as llama.cpp's CPU path does, so
`quantize=` is accepted for signature compatibility with the CPU kernels and ignored.

The per-format constants (block size, bytes per block, field offsets) come from
`localllm.formats.quants.LAYOUTS` and reach the kernels as `tl.constexpr`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from localllm.errors import KernelError
from localllm.formats.quants import LAYOUTS

Q = GGMLQuantizationType

# Tensor-core product of float32 tiles at about float32 accuracy (plain "tf32" keeps 10 mantissa
# bits: ~1e-3 relative error, too coarse for logits).
DOT_PRECISION = "tf32x3"

# Format codes the kernels branch on at compile time (kernels may only read constexpr globals).
_F32, _F16, _BF16, _Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _Q4_K, _Q5_K, _Q6_K, _TQ2_0 = (tl.constexpr(i) for i in range(12))

# Weights of one plane a matvec program decodes per step (over its rows). Measured on an H200
# (benchmarks/gpu.py --sweep): 4096 beat 1024 and 2048 on the quantized formats, 8 warps and
# software pipelining (tl.range num_stages) did not help.
MATVEC_TILE = 4096
MATVEC_WARPS = 4
# Up to this many activation rows (speculative decoding's verification batches) a matmul streams
# the weights once through the matvec kernel instead of padding tl.dot tiles to 16 rows.
MATVEC_MAX_ROWS = 8

# Under the interpreter (tensors in host memory): weight rows per program and weights per step.
# HOST_TILES False gives host tensors the GPU's tiles, for tests that run those through it.
HOST_TILES = True
INTERPRETER_ROWS = 256
INTERPRETER_TILE = 1 << 16

# Float "blocks" hold one value; the kernels group this many consecutive values into a unit.
_FLOAT_LANES = 32


@dataclass(frozen=True)
class Geometry:
    """How the kernels walk one format: `units` x `lanes` bytes x `planes` weights per block,
    plus the constexpr arguments that describe the block to the kernels."""

    code: int
    units: int
    lanes: int
    planes: int
    block_size: int
    type_size: int
    off_d: int = 0
    off_m: int = 0
    off_qs: int = 0
    off_qh: int = 0
    off_sc: int = 0

    @cached_property
    def constexprs(self) -> dict:
        """The kernels' format arguments (built once: a decode step launches hundreds of products)."""
        return {
            "FMT": self.code,
            "G": self.units,
            "L": self.lanes,
            "P": self.planes,
            "BS": self.block_size,
            "TS": self.type_size,
            "OFF_D": self.off_d,
            "OFF_M": self.off_m,
            "OFF_QS": self.off_qs,
            "OFF_QH": self.off_qh,
            "OFF_SC": self.off_sc,
        }


def _geometry(qtype, code, units, lanes, planes, **fields) -> Geometry:
    layout = LAYOUTS[qtype]
    offsets = {f"off_{key}": layout.field(name).offset for key, name in fields.items()}
    if qtype in (Q.F32, Q.F16, Q.BF16):
        block_size, type_size = _FLOAT_LANES, _FLOAT_LANES * layout.type_size
    else:
        block_size, type_size = layout.block_size, layout.type_size
    if units * lanes * planes != block_size:
        raise AssertionError(f"{qtype.name}: {units}x{lanes}x{planes} does not cover a {block_size}-weight block")
    # f16 scales are read through a 2-byte pointer: blocks and fields must stay 2-byte aligned.
    if type_size % 2 or any(f.offset % 2 for f in layout.scale_fields):
        raise AssertionError(f"{qtype.name}: f16 fields are not 2-byte aligned")
    return Geometry(code.value, units, lanes, planes, block_size, type_size, **offsets)


GEOMETRIES: dict[GGMLQuantizationType, Geometry] = {
    Q.F32: _geometry(Q.F32, _F32, 1, _FLOAT_LANES, 1),
    Q.F16: _geometry(Q.F16, _F16, 1, _FLOAT_LANES, 1),
    Q.BF16: _geometry(Q.BF16, _BF16, 1, _FLOAT_LANES, 1),
    Q.Q4_0: _geometry(Q.Q4_0, _Q4_0, 1, 16, 2, d="d", qs="qs"),
    Q.Q4_1: _geometry(Q.Q4_1, _Q4_1, 1, 16, 2, d="d", m="m", qs="qs"),
    Q.Q5_0: _geometry(Q.Q5_0, _Q5_0, 1, 16, 2, d="d", qh="qh", qs="qs"),
    Q.Q5_1: _geometry(Q.Q5_1, _Q5_1, 1, 16, 2, d="d", m="m", qh="qh", qs="qs"),
    Q.Q8_0: _geometry(Q.Q8_0, _Q8_0, 1, 32, 1, d="d", qs="qs"),
    # Unit j: qs bytes 32j..32j+31, whose two nibbles are sub-blocks 2j and 2j+1.
    Q.Q4_K: _geometry(Q.Q4_K, _Q4_K, 4, 32, 2, d="d", m="dmin", sc="scales", qs="qs"),
    Q.Q5_K: _geometry(Q.Q5_K, _Q5_K, 4, 32, 2, d="d", m="dmin", sc="scales", qh="qh", qs="qs"),
    # Unit 4h + 2jj + lh: the 16 weights 128h + 32(jj + 2 plane) + 16lh + lane share one scale.
    Q.Q6_K: _geometry(Q.Q6_K, _Q6_K, 8, 16, 2, d="d", qs="ql", qh="qh", sc="scales"),
    # Unit h: qs bytes 32h..32h+31, whose four crumbs are weights 128h + 32 plane + lane.
    Q.TQ2_0: _geometry(Q.TQ2_0, _TQ2_0, 2, 32, 4, d="d", qs="qs"),
}

SUPPORTED_TYPES = frozenset(GEOMETRIES)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1). Plain Python: triton's helpers of the same use cost
    microseconds a call, and a decode step makes hundreds of launches."""
    return 1 << max(0, n - 1).bit_length()


def _type_name(qtype) -> str:
    return getattr(qtype, "name", str(qtype))


def default_device() -> torch.device:
    """torch's default device if one was set, else cuda where there is one, else cpu (the
    Triton interpreter)."""
    device = torch.get_default_device()
    if device.type != "cpu":
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class CheckedWeight:
    """A weight (anything with .raw, .type and .shape) checked as the CPU kernels check it, with its
    raw bytes uploaded once to `device` (default: default_device()) as a uint8 (rows, row_bytes)
    tensor."""

    __slots__ = ("raw", "type", "shape", "name", "geometry", "n_units")

    def __init__(self, weight, device=None):
        from localllm.kernels.cpu import CheckedWeight as CpuCheckedWeight

        name = getattr(weight, "name", "weight")
        qtype = getattr(weight, "type", None)
        if qtype is not None and qtype not in GEOMETRIES:
            raise KernelError(f"{name}: no GPU kernels for tensor type {_type_name(qtype)}")
        checked = CpuCheckedWeight(weight)
        self.type = checked.type
        self.shape = checked.shape
        self.name = checked.name
        self.geometry = GEOMETRIES[checked.type]
        self.n_units = cdiv(self.shape[1], self.geometry.block_size) * self.geometry.units
        with warnings.catch_warnings():
            # The bytes are only read (copied to the device), never written through this view.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            host = torch.from_numpy(checked.raw)
        self.raw = host.to(default_device() if device is None else torch.device(device), copy=True)

    def __repr__(self) -> str:
        return f"CheckedWeight({self.name!r}, {_type_name(self.type)}, shape={self.shape}, device={self.raw.device})"


# --- dequantization of one plane of a tile -------------------------------------------------------


@triton.jit
def _f16_at(ptr, mask):
    return tl.load(ptr.to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _byte_at(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _int_as_float(q, OFFSET: tl.constexpr):
    """float(q) - OFFSET for an int32 0 <= q < 2^23, exactly: q placed in the mantissa of 2^23 (one
    logic op and one add, where a conversion instruction runs at a quarter of the rate)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _column(u, lane, PLANE: tl.constexpr, FMT: tl.constexpr, G: tl.constexpr, L: tl.constexpr, BS: tl.constexpr):
    """Column (within the row) of the weight at (unit, lane) of plane PLANE."""
    g = u % G
    if FMT == _Q6_K:
        # g = 4h + 2jj + lh: weight 128h + 32(jj + 2 PLANE) + 16lh + lane.
        within = (g // 4) * 128 + ((g // 2) % 2) * 32 + PLANE * 64 + (g % 2) * 16 + lane
    else:
        within = g * (BS // G) + PLANE * L + lane
    return (u // G) * BS + within


@triton.jit
def _dequant(
    raw,
    row_off,
    u,
    lane,
    live,
    cols,
    PLANE: tl.constexpr,
    FMT: tl.constexpr,
    G: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    BS: tl.constexpr,
    TS: tl.constexpr,
    OFF_D: tl.constexpr,
    OFF_M: tl.constexpr,
    OFF_QS: tl.constexpr,
    OFF_QH: tl.constexpr,
    OFF_SC: tl.constexpr,
):
    """Float32 weights of plane PLANE at (row_off, unit u, lane), broadcast over their shapes.

    `row_off` (int64 byte offsets of rows) and `u` broadcast to the shape of the per-unit fields,
    `live` is their mask; `lane` adds the byte axis. Masked weights come out 0.
    """
    blk = (u // G).to(tl.int64)
    g = u % G
    base = raw + row_off + blk * TS
    if FMT == _F32 or FMT == _F16 or FMT == _BF16:
        col = (u * L + lane).to(tl.int64)
        mask = live & (col < cols)
        if FMT == _F32:
            w = tl.load((raw + row_off).to(tl.pointer_type(tl.float32)) + col, mask=mask, other=0.0)
        elif FMT == _F16:
            w = tl.load((raw + row_off).to(tl.pointer_type(tl.float16)) + col, mask=mask, other=0.0).to(tl.float32)
        else:
            bits = tl.load((raw + row_off).to(tl.pointer_type(tl.uint16)) + col, mask=mask, other=0)
            w = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif FMT == _Q8_0:
        d = _f16_at(base + OFF_D, live)
        # Signed bytes: flipping the top bit gives q + 128.
        w = _int_as_float(_byte_at(base + OFF_QS + lane, live) ^ 128, 128) * d
    elif FMT == _Q4_0 or FMT == _Q4_1 or FMT == _Q5_0 or FMT == _Q5_1:
        d = _f16_at(base + OFF_D, live)
        q = (_byte_at(base + OFF_QS + lane, live) >> (4 * PLANE)) & 15
        if FMT == _Q5_0 or FMT == _Q5_1:
            # Weight p = 16 PLANE + lane takes bit p of the little-endian 32-bit qh as bit 4.
            p = PLANE * L + lane
            q |= ((_byte_at(base + OFF_QH + p // 8, live) >> (p % 8)) & 1) << 4
        if FMT == _Q4_0:
            w = _int_as_float(q, 8) * d
        elif FMT == _Q5_0:
            w = _int_as_float(q, 16) * d
        else:
            w = d * _int_as_float(q, 0) + _f16_at(base + OFF_M, live)
    elif FMT == _Q4_K or FMT == _Q5_K:
        d = _f16_at(base + OFF_D, live)
        dmin = _f16_at(base + OFF_M, live)
        # Sub-block b = 2g + PLANE: 6-bit scale and min. b < 4 keeps them in the low bits of
        # bytes b and b + 4; b >= 4 takes nibbles of byte b + 4 and the top bits of bytes b - 4, b.
        b = 2 * g + PLANE
        sa = _byte_at(base + OFF_SC + b, live)
        sb = _byte_at(base + OFF_SC + b + 4, live)
        sc_low = _byte_at(base + OFF_SC + (b & 3), live)
        sc = tl.where(b < 4, sa & 63, (sb & 15) | ((sc_low >> 6) << 4))
        mn = tl.where(b < 4, sb & 63, (sb >> 4) | ((sa >> 6) << 4))
        q = (_byte_at(base + OFF_QS + 32 * g + lane, live) >> (4 * PLANE)) & 15
        if FMT == _Q5_K:
            q |= ((_byte_at(base + OFF_QH + lane, live) >> b) & 1) << 4
        w = (d * _int_as_float(sc, 0)) * _int_as_float(q, 0) - dmin * _int_as_float(mn, 0)
    elif FMT == _Q6_K:
        h = g // 4
        jj = (g // 2) % 2
        lh = g % 2
        j = jj + 2 * PLANE
        d = _f16_at(base + OFF_D, live)
        scale = tl.load(base + OFF_SC + 8 * h + 2 * j + lh, mask=live, other=0).to(tl.int8, bitcast=True)
        low = (_byte_at(base + OFF_QS + 64 * h + 32 * jj + 16 * lh + lane, live) >> (4 * PLANE)) & 15
        high = (_byte_at(base + OFF_QH + 32 * h + 16 * lh + lane, live) >> (2 * j)) & 3
        w = (d * scale.to(tl.float32)) * _int_as_float(low | (high << 4), 32)
    else:
        tl.static_assert(FMT == _TQ2_0, "unknown format code")
        d = _f16_at(base + OFF_D, live)
        q = (_byte_at(base + OFF_QS + 32 * g + lane, live) >> (2 * PLANE)) & 3
        w = _int_as_float(q, 1) * d
    return w


# --- kernels --------------------------------------------------------------------------------------


@triton.jit
def _matvec_kernel(
    raw,
    X,
    out,
    n,
    rows,
    cols,
    row_bytes,
    n_units,
    BLOCK_A: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_U: tl.constexpr,
    FMT: tl.constexpr,
    G: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    BS: tl.constexpr,
    TS: tl.constexpr,
    OFF_D: tl.constexpr,
    OFF_M: tl.constexpr,
    OFF_QS: tl.constexpr,
    OFF_QH: tl.constexpr,
    OFF_SC: tl.constexpr,
):
    """out[a, r] = X[a] . weight[r] for the few activation rows a < n <= BLOCK_A: one pass over the
    weights, each dequantized tile multiplying every activation row. Axes: (activation, row,
    unit, lane)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_live = (r < rows)[None, :, None, None]
    row_off = r.to(tl.int64)[None, :, None, None] * row_bytes
    a = tl.arange(0, BLOCK_A)[:, None, None, None]
    x_rows = X + a.to(tl.int64) * cols
    a_live = a < n
    unit = tl.arange(0, BLOCK_U)[None, None, :, None]
    lane = tl.arange(0, L)[None, None, None, :]
    acc = tl.zeros((BLOCK_A, BLOCK_R, BLOCK_U, L), dtype=tl.float32)
    for start in range(0, n_units, BLOCK_U):
        u = start + unit
        live = row_live & (u < n_units)
        for plane in tl.static_range(P):
            col = _column(u, lane, plane, FMT, G, L, BS)
            w = _dequant(
                raw, row_off, u, lane, live, cols, plane, FMT, G, L, P, BS, TS, OFF_D, OFF_M, OFF_QS, OFF_QH, OFF_SC
            )
            xv = tl.load(x_rows + col, mask=a_live & (col < cols), other=0.0)
            acc += w * xv
    result = tl.sum(tl.sum(acc, axis=3), axis=2)
    a2 = tl.arange(0, BLOCK_A)[:, None]
    r2 = r[None, :]
    tl.store(out + a2.to(tl.int64) * rows + r2, result, mask=(a2 < n) & (r2 < rows))


@triton.jit
def _matmul_kernel(
    raw,
    X,
    out,
    n,
    rows,
    cols,
    row_bytes,
    n_units,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_U: tl.constexpr,
    DOT: tl.constexpr,
    FMT: tl.constexpr,
    G: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    BS: tl.constexpr,
    TS: tl.constexpr,
    OFF_D: tl.constexpr,
    OFF_M: tl.constexpr,
    OFF_QS: tl.constexpr,
    OFF_QH: tl.constexpr,
    OFF_SC: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    a = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_live = (r < rows)[:, None]
    row_off = r.to(tl.int64)[:, None] * row_bytes
    x_rows = X + a.to(tl.int64)[:, None] * cols
    a_live = (a < n)[:, None]
    # The tile's K axis enumerates (unit, lane) pairs; the activations are gathered to match.
    k = tl.arange(0, BLOCK_U * L)[None, :]
    unit = k // L
    lane = k % L
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for start in range(0, n_units, BLOCK_U):
        u = start + unit
        live = row_live & (u < n_units)
        for plane in tl.static_range(P):
            col = _column(u, lane, plane, FMT, G, L, BS)
            w = _dequant(
                raw, row_off, u, lane, live, cols, plane, FMT, G, L, P, BS, TS, OFF_D, OFF_M, OFF_QS, OFF_QH, OFF_SC
            )
            xt = tl.load(x_rows + col, mask=a_live & (col < cols), other=0.0)
            acc = tl.dot(xt, tl.trans(w), acc, input_precision=DOT)
    tl.store(out + a.to(tl.int64)[:, None] * rows + r[None, :], acc, mask=a_live & (r < rows)[None, :])


@triton.jit
def _embed_kernel(
    raw,
    ids,
    out,
    cols,
    row_bytes,
    n_units,
    BLOCK_U: tl.constexpr,
    FMT: tl.constexpr,
    G: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    BS: tl.constexpr,
    TS: tl.constexpr,
    OFF_D: tl.constexpr,
    OFF_M: tl.constexpr,
    OFF_QS: tl.constexpr,
    OFF_QH: tl.constexpr,
    OFF_SC: tl.constexpr,
):
    i = tl.program_id(0)
    row_off = tl.load(ids + i).to(tl.int64) * row_bytes
    u = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)[:, None]
    lane = tl.arange(0, L)[None, :]
    live = u < n_units
    out_row = out + i.to(tl.int64) * cols
    for plane in tl.static_range(P):
        col = _column(u, lane, plane, FMT, G, L, BS)
        w = _dequant(
            raw, row_off, u, lane, live, cols, plane, FMT, G, L, P, BS, TS, OFF_D, OFF_M, OFF_QS, OFF_QH, OFF_SC
        )
        tl.store(out_row + col, w, mask=live & (col < cols))


# --- launch ---------------------------------------------------------------------------------------


def _check_weight(weight) -> CheckedWeight:
    if not isinstance(weight, CheckedWeight):
        raise KernelError(
            f"weight must be a localllm.kernels.gpu.CheckedWeight (uploaded once), got {type(weight).__name__}"
        )
    return weight


def check_tensor(name: str, a, ndim, device, dtypes=(torch.float32,)) -> torch.Tensor:
    """`a` if it is a contiguous torch tensor of rank `ndim`, a dtype in `dtypes`, on `device`."""
    if not isinstance(a, torch.Tensor):
        raise KernelError(f"{name} must be a torch tensor, got {type(a).__name__}")
    ranks = (ndim,) if isinstance(ndim, int) else ndim
    if a.ndim not in ranks:
        raise KernelError(f"{name} must be {' or '.join(f'{r}-D' for r in ranks)}, got shape {tuple(a.shape)}")
    if a.dtype not in dtypes:
        raise KernelError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {a.dtype}")
    if device is not None and a.device != device:
        raise KernelError(f"{name} is on {a.device}, expected {device}")
    if not a.is_contiguous():
        raise KernelError(f"{name} must be contiguous (use .contiguous())")
    return a


def check_out(out, shape: tuple[int, ...], device) -> torch.Tensor:
    """A fresh float32 tensor of `shape` on `device`, or `out` after checking it fits."""
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    check_tensor("out", out, len(shape), device)
    if tuple(out.shape) != shape:
        raise KernelError(f"out must have shape {shape}, got {tuple(out.shape)}")
    return out


def _on_host(weight: CheckedWeight) -> bool:
    """Whether the weight's products take the interpreter's tiles."""
    return HOST_TILES and weight.raw.device.type == "cpu"


def _pow2_units(n_units: int, cap: int) -> int:
    """Units per step: a power of two up to `cap`, preferring one that divides n_units (no masked
    tail) unless that would make the steps four times smaller."""
    best = min(cap, next_pow2(n_units))
    divisor = best
    while n_units % divisor:
        divisor //= 2
    return divisor if divisor * 4 >= best else best


def _matvec_config(n: int, rows: int, n_units: int, geometry: Geometry, host: bool) -> tuple[int, int, int, int]:
    """(activation rows, weight rows, units per step, warps) of a matvec program; `host`: tensors
    in host memory, so the kernel runs in Triton's interpreter."""
    block_a = next_pow2(n)
    if host:
        # The interpreter runs programs one after another, each step a few NumPy calls whatever
        # the tile's size: few programs with big tiles (a GPU would spill them to memory).
        block_r = min(INTERPRETER_ROWS, next_pow2(rows))
        return (
            block_a,
            block_r,
            min(next_pow2(n_units), max(1, INTERPRETER_TILE // block_a // block_r // geometry.lanes)),
            1,
        )
    # A few rows per program, enough programs to fill the device, and about MATVEC_TILE products
    # per step: several KB of loads in flight per program.
    block_r = 4 if rows >= 4096 else 2
    block_u = _pow2_units(n_units, max(1, MATVEC_TILE // block_a // block_r // geometry.lanes))
    return block_a, block_r, block_u, MATVEC_WARPS


def _matvec_launch(weight: CheckedWeight, X: torch.Tensor, out: torch.Tensor) -> None:
    """out (n, rows) = X (n, cols) @ weight.T for n <= MATVEC_MAX_ROWS, streaming the weight once."""
    rows, cols = weight.shape
    geometry = weight.geometry
    n_units = weight.n_units
    n = X.shape[0]
    block_a, block_r, block_u, num_warps = _matvec_config(n, rows, n_units, geometry, _on_host(weight))
    _matvec_kernel[(cdiv(rows, block_r),)](
        weight.raw,
        X,
        out,
        n,
        rows,
        cols,
        weight.raw.shape[1],
        n_units,
        BLOCK_A=block_a,
        BLOCK_R=block_r,
        BLOCK_U=block_u,
        **geometry.constexprs,
        num_warps=num_warps,
    )


def matvec(weight, x: torch.Tensor, out: torch.Tensor | None = None, *, quantize: bool = True) -> torch.Tensor:
    """weight @ x for one float32 activation vector x (cols,): float32 (rows,).

    `quantize` is accepted for the CPU kernels' signature and ignored: activations stay float32.
    """
    weight = _check_weight(weight)
    rows, cols = weight.shape
    device = weight.raw.device
    check_tensor("x", x, 1, device)
    if x.shape[0] != cols:
        raise KernelError(f"x has {x.shape[0]} values, but {weight.name} has {cols} columns")
    out = check_out(out, (rows,), device)
    _matvec_launch(weight, x[None], out[None])
    return out


def _matmul_config(n: int, n_units: int, geometry: Geometry, host: bool) -> tuple[int, int, int, int]:
    """(activation rows, weight rows, units per step, warps) of a matmul tile; `host` as for
    _matvec_config."""
    if host:
        block_n = max(16, min(128, next_pow2(n)))
        block_r = INTERPRETER_ROWS
        return block_n, block_r, min(next_pow2(n_units), max(1, INTERPRETER_TILE // block_r // geometry.lanes)), 1
    # 32 weights of K per dot (tl.dot needs at least 16): with tf32x3's split operands a wider K
    # spills registers (checked with ptxas for sm_90). On an H200 (benchmarks/gpu.py --sweep),
    # 16 activation rows ran fastest against 32 weight rows (more programs), and 128 rows twice
    # as fast in 128x128 tiles as in 64x64 ones.
    k_units = max(1, 32 // geometry.lanes)
    if n <= 16:
        return 16, 32, k_units, 4
    if n <= 32:
        return 32, 64, k_units, 4
    return 128, 128, k_units, 8


def matmul(weight, X: torch.Tensor, out: torch.Tensor | None = None, *, quantize: bool = True) -> torch.Tensor:
    """X @ weight.T for n >= 1 float32 activation rows X (n, cols): float32 (n, rows).

    `quantize` is ignored, as in matvec.
    """
    weight = _check_weight(weight)
    rows, cols = weight.shape
    device = weight.raw.device
    check_tensor("X", X, 2, device)
    if X.shape[1] != cols:
        raise KernelError(f"X has {X.shape[1]} values per row, but {weight.name} has {cols} columns")
    n = X.shape[0]
    if n < 1:
        raise KernelError(f"matmul takes at least one activation row, got {n}")
    out = check_out(out, (n, rows), device)
    if n <= MATVEC_MAX_ROWS:
        _matvec_launch(weight, X, out)
        return out
    geometry = weight.geometry
    n_units = weight.n_units
    block_n, block_r, block_u, num_warps = _matmul_config(n, n_units, geometry, _on_host(weight))
    grid = (cdiv(rows, block_r), cdiv(n, block_n))
    _matmul_kernel[grid](
        weight.raw,
        X,
        out,
        n,
        rows,
        cols,
        weight.raw.shape[1],
        n_units,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        BLOCK_U=block_u,
        DOT=DOT_PRECISION,
        **geometry.constexprs,
        num_warps=num_warps,
    )
    return out


def embed(weight, ids, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `ids` of the dequantized weight (an embedding lookup): float32 (len(ids), cols).

    `ids` is a 1-D integer tensor on the weight's device, or anything torch.as_tensor takes
    (a list, a numpy array), which is copied there.
    """
    weight = _check_weight(weight)
    rows, cols = weight.shape
    device = weight.raw.device
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise KernelError(f"ids must be a 1-D sequence of integers: {exc}") from None
    if ids.ndim != 1 or not (ids.dtype in (torch.int32, torch.int64) or ids.numel() == 0):
        raise KernelError(f"ids must be a 1-D sequence of int32/int64, got shape {tuple(ids.shape)} dtype {ids.dtype}")
    ids = ids.to(device=device, dtype=torch.int64).contiguous()
    if ids.numel():
        # One synchronising check: an id out of range would read outside the weight.
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= rows:
            bad = low if low < 0 else high
            raise KernelError(f"id {bad} is out of range for {weight.name} with {rows} rows")
    m = ids.shape[0]
    out = check_out(out, (m, cols), device)
    if m == 0:
        return out
    geometry = weight.geometry
    n_units = weight.n_units
    block_u = min(next_pow2(n_units), max(1, 1024 // geometry.lanes))
    grid = (m, cdiv(n_units, block_u))
    _embed_kernel[grid](
        weight.raw,
        ids,
        out,
        cols,
        weight.raw.shape[1],
        n_units,
        BLOCK_U=block_u,
        **geometry.constexprs,
        num_warps=4,
    )
    return out
