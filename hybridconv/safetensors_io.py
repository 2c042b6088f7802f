"""Safetensors headers, read and written without loading tensors.

The format: 8 bytes little-endian header length ``n``, ``n`` bytes of JSON
(``name -> {dtype, shape, data_offsets: [begin, end]}`` plus an optional
``__metadata__``), then the data section. Offsets are relative to the data
section. Headers are validated before anything is read: a truncated file or a
tensor whose offsets do not fit its shape is reported naming the file and the
tensor, not discovered as garbage later.

Data is moved in bounded chunks (:data:`CHUNK_BYTES`), so converting a 1 GB
embedding never holds 1 GB in memory.

FP8 block-scaled weights (``float8_e4m3fn`` / ``float8_e5m2`` values with a
``weight_scale_inv`` per block of ``[bm, bn]`` elements: the format of
DeepSeek-V3's and Qwen's FP8 releases, transformers' ``quant_method: fp8``)
are read as float32 by :func:`dequantize`: each code decoded exactly through a
256-entry table, times the scale of the block holding it, ``scale[i // bm,
j // bn]`` (blocks at the right and bottom edges may be partial). A
:class:`TensorInfo` whose ``scale`` is set (see
:func:`hybridconv.checkpoint.attach_scales`) is read so everywhere: by the
converter and quantizer (:func:`iter_float_chunks`, :func:`rows_float32`) and
by verify's reference (:func:`read_float32`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from .errors import CheckpointError

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit
CHUNK_BYTES = 64 * 1024 * 1024
PAGE = 4096


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset in the file
    end: int
    # An FP8 weight's block scales: its data is read dequantized (module docstring).
    # Kept by dataclasses.replace, so a byte range cut from the weight (an expert
    # of a stack, a part of a split) is dequantized at its own position.
    scale: "BlockScale | None" = None

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Tensors (in file order) and ``__metadata__`` of one safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte header length)",
                    "the download or copy was interrupted; fetch the file again",
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} runs past the end of the file ({size} bytes)",
                    "the file is truncated or not a safetensors file; fetch it again",
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, name, entry, data_start, data_len)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors '{a}' and '{b}' overlap in the data section")
    order = sorted(tensors.values(), key=lambda t: (t.begin, t.name))
    return {t.name: t for t in order}, metadata


def _parse_entry(path: Path, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CheckpointError(
            f"{where}: unknown dtype {dtype!r} (known: {', '.join(sorted(ITEMSIZE))})"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the data section (0..{data_len})",
            "the file is truncated or corrupt; fetch it again",
        )
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: shape {shape} x {dtype} needs {expected} bytes, offsets give {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


# --- conversions between raw storage and float32 ------------------------------------

_NP_RAW = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "F8_E8M0": np.uint8,
}  # fmt: skip


def _fp8_table(dtype: str) -> np.ndarray:
    """The float32 value of each of the 256 codes of an 8-bit float format:
    ``F8_E4M3`` (float8_e4m3fn: bias 7, no infinities, NaN at S.1111.111),
    ``F8_E5M2`` (IEEE-style: bias 15, infinities and NaNs at exponent 31),
    ``F8_E8M0`` (scales: 2^(code - 127), NaN at 255). Every value is exact in
    float32."""
    table = _FP8_TABLES.get(dtype)
    if table is not None:
        return table
    codes = np.arange(256)
    if dtype == "F8_E8M0":
        table = np.full(256, np.nan, dtype=np.float32)  # 255: NaN
        table[:255] = np.ldexp(1.0, codes[:255] - 127)
    else:
        ebits, mbits, bias = (4, 3, 7) if dtype == "F8_E4M3" else (5, 2, 15)
        sign = np.where(codes >> 7, -1.0, 1.0)
        e = (codes >> mbits) & ((1 << ebits) - 1)
        m = codes & ((1 << mbits) - 1)
        frac = m / float(1 << mbits)
        value = np.where(e == 0, np.ldexp(frac, 1 - bias), np.ldexp(1.0 + frac, e - bias))
        table = (sign * value).astype(np.float32)
        top = (1 << ebits) - 1
        if dtype == "F8_E4M3":
            table[(e == top) & (m == (1 << mbits) - 1)] = np.nan
        else:
            table[(e == top) & (m != 0)] = np.nan
            table[(e == top) & (m == 0)] = sign[(e == top) & (m == 0)] * np.inf
    _FP8_TABLES[dtype] = table
    return table


_FP8_TABLES: dict[str, np.ndarray] = {}


def has_nonfinite(raw: np.ndarray, dtype: str) -> bool:
    """Whether raw floating data holds a NaN or an infinity (ints: never).

    bfloat16 is checked through two float32 views of the same bytes, shifted by
    one element: a float32 is non-finite exactly when its high half (a whole
    bfloat16) is, so the two views cover every element at float32 speed."""
    if dtype == "F32":
        return not np.isfinite(raw.view(np.float32)).all()
    if dtype == "F64":
        return not np.isfinite(raw.view(np.float64)).all()
    if dtype == "F16":
        return not np.isfinite(raw.view(np.float16)).all()
    if dtype in FP8_DTYPES or dtype == "F8_E8M0":
        return not np.isfinite(_fp8_table(dtype)[np.unique(raw.view(np.uint8))]).all()
    if dtype == "BF16":
        u = raw.view(np.uint16).reshape(-1)
        n = u.size
        if n == 0:
            return False
        if n % 2:  # an odd element out: check it alone
            if (int(u[-1]) & 0x7F80) == 0x7F80:
                return True
            u = u[:-1]
        if u.size == 0:
            return False
        high = u.view(np.float32)  # odd elements in the high halves
        if not np.isfinite(high).all():
            return True
        shifted = np.frombuffer(u.data, dtype=np.float32, count=u.size // 2 - 1, offset=2) if u.size > 2 else None
        if shifted is not None and not np.isfinite(shifted).all():
            return True
        return (int(u[0]) & 0x7F80) == 0x7F80  # element 0 is only ever a low half
    return False


def scan_nonfinite(path: Path, tensors: list[TensorInfo]) -> list[str]:
    """Names of ``tensors`` (all in ``path``) holding NaN or Inf.

    Reads through short-lived memory-mapped windows of :data:`CHUNK_BYTES`: no copy
    out of the page cache, and at most one window resident at a time."""
    import mmap

    bad: list[str] = []
    gran = mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        fd = f.fileno()
        for t in tensors:
            item = ITEMSIZE[t.dtype]
            pos = t.begin
            while pos < t.end:
                start = pos - pos % gran
                length = min(CHUNK_BYTES, t.end - start)
                n = (start + length - pos) // item * item
                mm = mmap.mmap(fd, length, offset=start, access=mmap.ACCESS_READ)
                try:
                    window = np.frombuffer(mm, dtype=np.uint8, count=n, offset=pos - start)
                    found = has_nonfinite(window, t.dtype)
                    del window  # release the buffer before unmapping
                finally:
                    mm.close()
                if found:
                    bad.append(t.name)
                    break
                pos += n
    return bad


def raw_array(buf: bytes | bytearray | memoryview, dtype: str) -> np.ndarray:
    """A numpy view of raw safetensors bytes (bfloat16 as its uint16 bits)."""
    return np.frombuffer(buf, dtype=_NP_RAW[dtype])


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype in FP8_DTYPES or dtype == "F8_E8M0":
        return _fp8_table(dtype)[raw.view(np.uint8)]  # the codes' values; block scales: dequantize()
    return raw.astype(np.float32)


# --- FP8 block-scaled weights -----------------------------------------------------------


@dataclass(frozen=True)
class BlockScale:
    """The scales of one FP8 weight: ``scale`` (``weight_scale_inv``, shape
    ``[*lead, ceil(R / bm), ceil(C / bn)]`` for a weight ``[*lead, R, C]``),
    the block ``(bm, bn)``, and the weight's own shape and first byte (so that
    any byte range of it is dequantized at its position)."""

    scale: TensorInfo
    block: tuple[int, int]
    shape: tuple[int, ...]
    weight_begin: int

    def grid(self) -> np.ndarray:
        """The scales as float32 ``[lead * ceil(R / bm), ceil(C / bn)]`` (small:
        one number per block; read once per weight and kept)."""
        return _scale_grid(self.scale, self.shape, self.block)


def _scale_grid(info: TensorInfo, shape: tuple[int, ...], block: tuple[int, int]) -> np.ndarray:
    key = (info.file, info.begin, shape, block)
    grid = _GRIDS.get(key)
    if grid is None:
        rows = shape[-2] if len(shape) > 1 else 1
        gr, gc = -(-rows // block[0]), -(-shape[-1] // block[1])
        grid = to_float32(read_tensor(info), info.dtype).astype(np.float32).reshape(-1, gc)
        if grid.shape[0] % gr:
            raise CheckpointError(f"{info.file}: scales '{info.name}' do not tile weight shape {list(shape)}")
        if len(_GRIDS) > 4096:
            _GRIDS.clear()
        _GRIDS[key] = grid
    return grid


_GRIDS: dict = {}


def dequantize(raw: np.ndarray, dtype: str, scale: BlockScale, first: int) -> np.ndarray:
    """Elements ``first, first + 1, ...`` (flat, row-major) of an FP8 weight,
    given as their raw codes, dequantized: value × its block's scale, in float32."""
    out = to_float32(raw.reshape(-1), dtype)
    if not out.flags.writeable:
        out = out.copy()
    shape, (bm, bn) = scale.shape, scale.block
    C = shape[-1]
    R = shape[-2] if len(shape) > 1 else 1
    gr = -(-R // bm)
    grid = scale.grid()
    n, pos = out.size, 0
    while pos < n:
        e = first + pos
        row, col = divmod(e, C)
        if col == 0 and n - pos >= C:  # whole rows: each column block times its scale
            nrows = (n - pos) // C
            rows = row + np.arange(nrows)
            srows = grid[(rows // R) * gr + (rows % R) // bm]  # [nrows, gc]
            block = out[pos : pos + nrows * C].reshape(nrows, C)
            for j in range(srows.shape[1]):
                block[:, j * bn : (j + 1) * bn] *= srows[:, j : j + 1]
            pos += nrows * C
        else:  # a part of one row
            take = min(n - pos, C - col)
            srow = grid[(row // R) * gr + (row % R) // bm]
            out[pos : pos + take] *= srow[(col + np.arange(take)) // bn]
            pos += take
    return out


def first_element(info: TensorInfo) -> int:
    """The flat index, within its FP8 weight, of ``info``'s first element."""
    return (info.begin - info.scale.weight_begin) // ITEMSIZE[info.dtype]


def rows_float32(info: TensorInfo, raw: np.ndarray, offset: int = 0) -> np.ndarray:
    """``raw`` (elements of ``info`` from element ``offset`` of ``info``) as float32:
    dequantized when ``info`` is block-scaled."""
    if info.scale is None:
        return to_float32(raw, info.dtype)
    return dequantize(raw, info.dtype, info.scale, first_element(info) + offset)


def read_float32(info: TensorInfo, f: BinaryIO | None = None) -> np.ndarray:
    """The whole tensor as float32 of its shape (FP8 weights dequantized): what
    a reference built from the source computes with. Floats are converted
    exactly; small or medium tensors only (it is read whole)."""
    return rows_float32(info, read_tensor(info, f)).reshape(info.shape)


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        u = x.view(np.uint32)
        # round to nearest, ties to even; keep NaNs NaN (quiet bit set)
        rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            rounded[nan] = ((u[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
        return rounded
    return x.astype(_NP_RAW[dtype])


def convert_raw(raw: np.ndarray, src: str, dst: str) -> np.ndarray:
    if src == dst:
        return raw
    return from_float32(to_float32(raw, src), dst)


# --- reading and writing ----------------------------------------------------------------


def read_tensor(info: TensorInfo, f: BinaryIO | None = None) -> np.ndarray:
    """The whole tensor as a raw numpy array of its shape (small tensors only)."""
    own = f is None
    f = f or open(info.file, "rb")
    try:
        f.seek(info.begin)
        buf = f.read(info.nbytes)
    finally:
        if own:
            f.close()
    if len(buf) != info.nbytes:
        raise CheckpointError(f"{info.file}: tensor '{info.name}' is truncated")
    return raw_array(buf, info.dtype).reshape(info.shape)


def iter_float_chunks(info: TensorInfo, f: BinaryIO, buf: bytearray) -> Iterator[tuple[np.ndarray, str, int]]:
    """``(data, dtype, source bytes)`` chunks of the tensor, flat: raw chunks of its
    own dtype, or, for a block-scaled FP8 weight, float32 dequantized values
    (read a quarter of ``buf`` at a time, so a chunk is never larger than
    ``buf``)."""
    if info.scale is None:
        for chunk in iter_raw_chunks(info, f, buf):
            yield chunk, info.dtype, chunk.nbytes
        return
    done = 0
    view = memoryview(buf)[: max(1, len(buf) // 4)]
    for chunk in iter_raw_chunks(info, f, view):
        n = chunk.size
        yield dequantize(chunk, info.dtype, info.scale, first_element(info) + done), "F32", n
        done += n


def chunk_buffer() -> bytearray:
    """A reusable read buffer: allocating a fresh one per read costs page faults
    that dominate the run time of a plain copy."""
    return bytearray(CHUNK_BYTES)


def iter_raw_chunks(info: TensorInfo, f: BinaryIO, buf) -> Iterator[np.ndarray]:
    """The tensor's raw elements, flat, in element-aligned chunks read into ``buf``.

    Each chunk is a view of ``buf``: consume it before asking for the next."""
    item = ITEMSIZE[info.dtype]
    step = max(item, len(buf) // item * item)
    view = memoryview(buf)
    f.seek(info.begin)
    remaining = info.nbytes
    while remaining:
        want = min(step, remaining)
        got = 0
        while got < want:
            n = f.readinto(view[got:want])
            if not n:
                raise CheckpointError(f"{info.file}: tensor '{info.name}' is truncated")
            got += n
        remaining -= want
        yield raw_array(view[:want], info.dtype)


def header_bytes(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict, data_start_mod: int | None = None
) -> bytes:
    """The header for tensors written back to back in ``entries`` order.

    The data section starts at a multiple of 8; with ``data_start_mod`` it starts
    at that offset modulo :data:`PAGE` (a multiple of 8), so that bytes copied
    from a source file keep their position within a page."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    if data_start_mod is not None and data_start_mod % 8 == 0:
        raw += b" " * ((data_start_mod - 8 - len(raw)) % PAGE)
    return struct.pack("<Q", len(raw)) + raw


def copy_bytes(
    src: BinaryIO, dst: BinaryIO, begin: int, nbytes: int, buf: bytearray, what: str
) -> None:
    """Copy ``nbytes`` from ``src`` at ``begin`` to ``dst``'s current position.

    Uses ``copy_file_range`` (the kernel copies, as ``cp`` does) where the OS and
    file system allow it, else reads and writes through ``buf``."""
    pos = dst.tell()
    if hasattr(os, "copy_file_range"):
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(src.fileno(), dst.fileno(), nbytes - done, begin + done, pos + done)
                if n == 0:
                    raise CheckpointError(f"{what}: truncated")
                done += n
            dst.seek(pos + done)
            return
        except OSError:
            dst.seek(pos)  # e.g. EXDEV or ENOSYS: fall back to a plain copy
    src.seek(begin)
    view = memoryview(buf)
    remaining = nbytes
    while remaining:
        n = src.readinto(view[: min(len(buf), remaining)])
        if not n:
            raise CheckpointError(f"{what}: truncated")
        write_all(dst, view[:n])
        remaining -= n


def write_all(f: BinaryIO, data) -> None:
    """Write a bytes-like object (a numpy array included) to an unbuffered file,
    looping over partial writes."""
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        view = view[n:]
