"""Writing merged shards: the input's bytes, with only the planned tensors' byte ranges rewritten.

A merge keeps every tensor's dtype and shape, so a shard's header and layout do not change: the
output is the input file with the folded (and replaced) tensors written over their own ranges.

* Where the filesystem shares extents (btrfs, XFS with reflink, bcachefs, ...) the whole file is
  cloned (``ioctl(FICLONE)``: no data copied) and only the planned ranges are written (``pwrite``).
* Elsewhere (ext4, tmpfs, NFS, ...) the untouched byte ranges are copied in the kernel with
  ``os.copy_file_range`` (``pread`` + ``pwrite`` through one buffer where the kernel refuses), so
  that no byte is written twice; the planned tensors are written in between (``pwrite``).

The copying runs in a thread of its own (:class:`BackgroundCopy`, started by
:func:`start_copying` before numpy is even imported: the kernel does the work, with the GIL
released), from the last shard backwards, while the calling thread imports numpy and folds from
the first shard forwards (:func:`write_planned`): the two overlap on two cores, and rarely write
the same file at once. Adapted weights are read a block of rows at a time
(:data:`FOLD_CHUNK_BYTES`), folded with :func:`ia3fx.offline_fold.fold_block` and written:
memory stays bounded whatever the tensor size. Nothing is ``mmap``-ed. This module imports numpy
(through :mod:`ia3fx.offline_fold`) only when it folds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .offline_format import (
    FLOATS,
    ITEMSIZE,
    CheckpointError,
    SafetensorsHeader,
    TensorInfo,
    read_exact,
    write_all,
)
from .offline_plan import Fold, Replace, torch_values

__all__ = [
    "BUFFER_BYTES",
    "COPY_CHUNK_BYTES",
    "FOLD_CHUNK_BYTES",
    "BackgroundCopy",
    "Copier",
    "Progress",
    "ShardJob",
    "check_size",
    "prepare_shard",
    "start_copying",
    "write_planned",
]

FOLD_CHUNK_BYTES = 4 << 20  # rows of an adapted weight read, folded and written at a time
COPY_CHUNK_BYTES = 64 << 20  # one copy_file_range call (progress granularity, and how soon a stop is seen)
BUFFER_BYTES = 8 << 20  # read/write buffer where copy_file_range is not available
USE_COPY_FILE_RANGE = hasattr(os, "copy_file_range")  # in-kernel copies (Linux); tests turn it off
USE_CLONE = sys.platform.startswith("linux")  # FICLONE where the filesystem shares extents
FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
_NOT_HERE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.ENOTTY, errno.EBADF)


def _fold():
    """:mod:`ia3fx.offline_fold` (numpy), imported on the first fold, once the copying has started."""
    from . import offline_fold

    return offline_fold


class Progress:
    """Bytes done: a tqdm bar on stderr (when asked, or when stderr is a terminal) or a callback."""

    def __init__(self, total: int, progress: bool | Callable[[int, int], None] | None) -> None:
        self.total, self.done = total, 0
        self.callback = progress if callable(progress) else None
        self.bar = None
        show = sys.stderr.isatty() if progress is None else progress is True
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def clone_file(src_fd: int, dst_fd: int) -> bool:
    """Make ``dst`` share ``src``'s extents (copy-on-write); ``False`` where the filesystem cannot."""
    if not USE_CLONE:
        return False
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno not in _NOT_HERE:
            raise
        return False
    return True


class Copier:
    """Copies byte ranges between files: in the kernel where possible, else through one buffer.
    ``stop`` (set by another thread) ends a copy between two chunks, with :class:`Stopped`."""

    def __init__(self, progress: Progress | BackgroundCopy, stop: threading.Event | None = None) -> None:
        self.progress = progress
        self.stop = stop
        self.kernel = USE_COPY_FILE_RANGE
        self._buf: bytearray | None = None

    def copy(self, src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int | None = None) -> None:
        """``length`` bytes from ``offset`` of ``src_fd`` to ``dst_offset`` (default: the same) of ``dst_fd``."""
        end = offset + length
        to = offset if dst_offset is None else dst_offset
        while offset < end:
            if self.stop is not None and self.stop.is_set():
                raise Stopped
            n = min(COPY_CHUNK_BYTES, end - offset)
            k = 0
            if self.kernel:
                try:
                    k = os.copy_file_range(src_fd, dst_fd, n, offset, to)
                except OSError as e:
                    if e.errno not in _NOT_HERE:
                        raise
                    self.kernel = False
                    continue
                if k == 0:
                    raise CheckpointError(f"unexpected end of file at byte {offset} (was the file changed while merging?)")
            else:
                if self._buf is None:
                    self._buf = bytearray(BUFFER_BYTES)
                k = min(n, BUFFER_BYTES)
                read_exact(src_fd, k, offset, self._buf)
                write_all(dst_fd, memoryview(self._buf)[:k], to)
            offset += k
            to += k
            self.progress.update(k)


class Stopped(Exception):
    """A background copy told to stop (the merge failed or was interrupted elsewhere)."""


# --- the untouched bytes: copied in a thread ---------------------------------------------------------
@dataclass
class ShardJob:
    """One output shard: its input, the tensors to fold or replace, and the ranges left to copy."""

    header: SafetensorsHeader
    out_path: str
    planned: list[tuple[TensorInfo, Fold | Replace]]  # by offset
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (offset, length): none where cloned


def prepare_shard(header: SafetensorsHeader, out_path: str, ops: dict[str, Fold | Replace],
                  progress: Progress, counts: dict[str, int]) -> ShardJob:
    """Create ``out_path`` (a clone of the shard where the filesystem can) and list what is left to
    copy: every byte range outside the planned tensors. ``counts["copied"]`` gets the tensors left as they are."""
    planned = [(info, ops[info.name]) for info in sorted(header.tensors.values(), key=lambda t: t.begin)
               if info.name in ops and info.numel > 0]
    counts["copied"] += len(header.tensors) - len(planned)
    job = ShardJob(header, out_path, planned)
    src_fd = os.open(header.path, os.O_RDONLY)
    try:
        dst_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            cloned = clone_file(src_fd, dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    if cloned:
        progress.update(header.file_size - sum(info.nbytes for info, _ in planned))
        return job
    pos = 0
    for info, _ in planned:
        if info.begin > pos:
            job.gaps.append((pos, info.begin - pos))
        pos = info.end
    if header.file_size > pos:
        job.gaps.append((pos, header.file_size - pos))
    return job


class BackgroundCopy(threading.Thread):
    """Copies the gaps of every shard, last shard first, while the caller folds from the first.

    Its progress is counted here and handed to the caller's :class:`Progress` by :meth:`report`
    (from the caller's thread: a progress callback never runs in this one). An error here is raised
    by :meth:`finish`; :meth:`cancel` stops the copy within one chunk.
    """

    def __init__(self, jobs: list[ShardJob]) -> None:
        super().__init__(name="ia3fx-merge-copy", daemon=True)
        self.jobs = [job for job in reversed(jobs) if job.gaps]
        self.done = 0  # bytes copied: written by this thread only
        self.reported = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def update(self, n: int) -> None:
        self.done += n

    def run(self) -> None:
        copier = Copier(self, self._stop_event)
        try:
            for job in self.jobs:
                src_fd = os.open(job.header.path, os.O_RDONLY)
                try:
                    dst_fd = os.open(job.out_path, os.O_WRONLY)
                    try:
                        for offset, length in job.gaps:
                            copier.copy(src_fd, dst_fd, offset, length)
                    finally:
                        os.close(dst_fd)
                finally:
                    os.close(src_fd)
        except Stopped:
            pass
        except BaseException as e:  # handed to the caller's thread by finish()
            self.error = e

    def report(self, progress: Progress) -> None:
        """Pass the bytes copied since the last call on to ``progress`` (call from the caller's thread);
        raise the copy's error as soon as there is one, rather than after the folds."""
        if self.error is not None:
            raise self.error
        done = self.done
        if done > self.reported:
            progress.update(done - self.reported)
            self.reported = done

    def finish(self, progress: Progress) -> None:
        """Wait for the copy (reporting progress meanwhile); its error, if any, is raised here."""
        while self.is_alive():
            self.join(0.05)
            self.report(progress)
        self.report(progress)
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Stop copying and wait for the thread (at most one chunk's copy): the files can then be removed."""
        self._stop_event.set()
        if self.is_alive():
            self.join()


def start_copying(jobs: list[ShardJob]) -> BackgroundCopy:
    """A started :class:`BackgroundCopy` of ``jobs``' gaps."""
    copier = BackgroundCopy(jobs)
    copier.start()
    return copier


# --- the planned tensors: folded or replaced in the caller's thread --------------------------------
def _source(info: TensorInfo, op: Fold | Replace, base_fd: int, adapter_fd: int | None):
    """``(read(row0, rows, buf) -> bytes, dtype)`` of the tensor to fold or write: the base's, or
    the adapter's copy (from its file, or from an ``adapter_model.bin`` already in memory)."""
    rep = op if isinstance(op, Replace) else op.replaced
    rows = info.shape[0] if info.shape else 1
    if rep is not None and rep.tensor is not None:
        values, dtype = torch_values(rep.tensor, rep.adapter_key)
        whole = _fold().encode(values, dtype).reshape(rows, -1).view("uint8")

        def read_memory(r0: int, r: int, buf: bytearray):
            return whole[r0 : r0 + r].reshape(-1)

        return read_memory, dtype
    src, fd = (rep.source, adapter_fd) if rep is not None else (info, base_fd)
    if src.dtype not in FLOATS and isinstance(op, Fold):
        raise CheckpointError(f"adapter tensor {rep.adapter_key!r} is {src.dtype}, not a floating-point weight")
    row_bytes = src.nbytes // rows if rows else 0

    def read_file(r0: int, r: int, buf: bytearray):
        return memoryview(read_exact(fd, r * row_bytes, src.begin + r0 * row_bytes, buf))[: r * row_bytes]

    return read_file, src.dtype


def _fold_tensor(base_fd: int, dst_fd: int, info: TensorInfo, op: Fold, vector, adapter_fd: int | None,
                 progress: Progress) -> None:
    """Read ``info`` (or the adapter's copy) in row blocks, fold each with ``vector``, write it in place."""
    fold = _fold()
    shape = info.shape
    rows = shape[0] if shape else 1
    rest = shape[1:]
    read, src_dtype = _source(info, op, base_fd, adapter_fd)
    src_row_bytes = info.numel // rows * ITEMSIZE[src_dtype]  # the adapter's copy may be in another dtype
    if op.is_bias:
        raw = read(0, rows, bytearray(rows * src_row_bytes))
        out, out_dtype = fold.fold_bias_values(raw, src_dtype, info.dtype, vector, op.kind, op.weight_dtype)
        if out_dtype != info.dtype:  # a conv bias in another dtype than its weight: keep the header's
            raise CheckpointError(f"merged bias {info.name!r} would change dtype {info.dtype}; cannot keep the header")
        write_all(dst_fd, out, info.begin)
        progress.update(info.nbytes)
        return
    scale = fold.weight_scale(op.kind, op.feedforward, vector, shape, op.groups)
    by_rows = scale.shape[0] != 1 and rows > 1  # the vector runs along dim 0: slice it with the rows
    block = max(1, min(rows, FOLD_CHUNK_BYTES // max(1, src_row_bytes)))
    buf = bytearray(block * src_row_bytes)
    out_row_bytes = info.nbytes // rows
    for r0 in range(0, rows, block):
        r = min(block, rows - r0)
        s = scale[r0 : r0 + r] if by_rows else scale
        out = fold.fold_block(read(r0, r, buf), src_dtype, info.dtype, (r,) + rest, s)
        write_all(dst_fd, out, info.begin + r0 * out_row_bytes)
        progress.update(r * out_row_bytes)


def _replace_tensor(base_fd: int, dst_fd: int, info: TensorInfo, op: Replace, adapter_fd: int | None, copier: Copier) -> None:
    """The adapter's copy of a tensor, in the base's dtype (PEFT's loader casts it so)."""
    src = op.source
    if src is not None and src.dtype == info.dtype:
        copier.copy(adapter_fd, dst_fd, src.begin, src.nbytes, info.begin)
        return
    read, src_dtype = _source(info, op, base_fd, adapter_fd)
    data = read(0, info.shape[0] if info.shape else 1, bytearray(info.numel * ITEMSIZE.get(src_dtype, 1)))
    if src_dtype in FLOATS and info.dtype in FLOATS:
        fold = _fold()
        data = fold.encode(fold.decode(data, src_dtype), info.dtype)
    elif src_dtype != info.dtype:
        raise CheckpointError(f"cannot cast adapter tensor {op.adapter_key!r} ({src_dtype}) to the base's dtype {info.dtype}")
    write_all(dst_fd, data, info.begin)
    copier.progress.update(info.nbytes)


def write_planned(job: ShardJob, vectors: dict, adapter_path: str | None, copier: Copier,
                  counts: dict[str, int], background: BackgroundCopy | None = None) -> None:
    """Fold or replace ``job``'s planned tensors in its output file (``vectors``: by adapter key, as
    :func:`ia3fx.offline_plan.load_vectors` gives them). ``counts`` gets ``merged``/``replaced``;
    ``background``'s progress is passed on after each tensor."""
    if not job.planned:
        return
    src_fd = os.open(job.header.path, os.O_RDONLY)
    adapter_fd = os.open(adapter_path, os.O_RDONLY) if adapter_path else None
    try:
        dst_fd = os.open(job.out_path, os.O_WRONLY)
        try:
            for info, op in job.planned:
                if isinstance(op, Fold):
                    _fold_tensor(src_fd, dst_fd, info, op, vectors[op.vector_key], adapter_fd, copier.progress)
                    counts["merged"] += 1
                else:
                    _replace_tensor(src_fd, dst_fd, info, op, adapter_fd, copier)
                    counts["replaced"] += 1
                if background is not None:
                    background.report(copier.progress)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
        if adapter_fd is not None:
            os.close(adapter_fd)


def check_size(job: ShardJob) -> None:
    """Once everything is written: the output has exactly the input's size."""
    size = os.path.getsize(job.out_path)
    if size != job.header.file_size:
        raise CheckpointError(f"wrote {size} bytes for {job.header.path}, expected {job.header.file_size}")
