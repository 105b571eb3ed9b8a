"""safetensors files as the offline merge reads them: headers parsed and checked, byte ranges read.

No torch and no ``safetensors`` package: a header is an 8-byte little-endian length and a JSON
object, and the merge needs only the names, dtypes, shapes and offsets in it, so that ``ia3fx merge``
starts without importing torch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from .errors import IA3Error

__all__ = ["CheckpointError", "SafetensorsHeader", "TensorInfo", "read_safetensors_header", "ITEMSIZE", "FLOATS"]

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit

# bytes per element of every dtype safetensors writes (F8 kinds and the unsigned ones included)
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
FLOATS = ("F64", "F32", "F16", "BF16")  # the dtypes a vector can be folded into


class CheckpointError(IA3Error, ValueError):
    """A checkpoint, an adapter, or the pair of them cannot be merged; nothing was written."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; ``begin``/``end`` are absolute offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    data_start: int  # 8 + header length
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, not even the 8-byte header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} bytes is implausible)")
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (the header needs {8 + n} bytes, the file has {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + n
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ must be a JSON object")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
            if not isinstance(dtype, str) or any(d < 0 for d in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: bad header entry for tensor {name!r} (needs dtype, shape, data_offsets): {entry!r}"
            ) from None
        if not 0 <= begin <= end:
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}]")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {data_start + end}, past the end of the file "
                f"({size} bytes): the file is truncated or its header is wrong"
            )
        info = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        if dtype in ITEMSIZE and info.numel * ITEMSIZE[dtype] != info.nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) needs "
                f"{info.numel * ITEMSIZE[dtype]} bytes, its data_offsets span {info.nbytes}"
            )
        tensors[name] = info
    last_end, last_name = data_start, None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < last_end:
            raise CheckpointError(f"{path}: tensors {last_name!r} and {info.name!r} overlap")
        last_end, last_name = info.end, info.name
    return SafetensorsHeader(path, data_start, size, tensors, metadata)


def read_exact(fd: int, n: int, offset: int, buf: bytearray | memoryview | None = None) -> bytearray | memoryview:
    """``n`` bytes of ``fd`` from ``offset`` into ``buf`` (a new buffer without one); a short file is an error."""
    out = bytearray(n) if buf is None else buf
    view = memoryview(out)[:n]
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise CheckpointError(f"unexpected end of file at byte {offset + got} (was the file changed while merging?)")
        got += k
    return out


def write_all(fd: int, data, offset: int) -> int:
    """Write all of ``data`` at ``offset`` of ``fd`` (``pwrite``: the file position is not used)."""
    view = memoryview(data).cast("B")
    n = 0
    while n < len(view):
        n += os.pwrite(fd, view[n:], offset + n)
    return n
