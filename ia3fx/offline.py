"""Merge a PEFT (IA)³ adapter into a transformers checkpoint on disk, without loading the model.

``merge_checkpoint(base_dir, adapter_dir, out_dir)`` writes ``out_dir``: the base directory with
every adapted weight (and attention-type bias) folded with its vector, and every
``modules_to_save`` tensor of the adapter in place of the base one. Shards keep their names, their
index and their headers byte for byte (merged tensors keep shape and dtype), so the output loads
exactly like the input.

How it runs at the speed of a copy (the parts, each in its own module):

* :mod:`ia3fx.offline_format`: safetensors headers are parsed here (8-byte length + JSON), with
  no torch and no safetensors package.
* :mod:`ia3fx.offline_plan`: which tensor gets which vector comes from the checkpoint's tensor
  names, the adapter's keys and its config (PEFT's name rules); only what names cannot tell (conv
  groups, regex or default targets, tied weights, ...) builds the model on the meta device
  (:mod:`ia3fx.offline_meta`, which imports torch and transformers).
* :mod:`ia3fx.offline_stream`: the output shard is the input's bytes with only the planned tensors
  rewritten: cloned (``FICLONE``) where the filesystem shares extents, else the untouched ranges
  copied in the kernel (``os.copy_file_range``, in a thread of its own); adapted weights are read,
  folded and written a few MB of rows at a time, so peak memory does not grow with the checkpoint.
* :mod:`ia3fx.offline_fold`: the fold in numpy, bit-identical to PEFT's ``merge_and_unload()``
  (and to :mod:`ia3fx.scaling`), bf16 included.

So a merge that the names settle imports neither torch nor transformers (``ia3fx merge`` starts in
a fraction of a second), and numpy only once the plan is made and checked and the kernel is
copying: its import overlaps with the copy.

Everything is written into a temporary sibling of ``out_dir`` (``.<out>.ia3fx-<host>-<pid>-<token>.partial``)
that is renamed into place at the end: a failure or Ctrl-C leaves no partial output, and with
``force=True`` the previous output survives until the new one is complete, then the two swap in one
step (``renameat2(RENAME_EXCHANGE)``, :func:`ia3fx.atomic_files.move_into_place`), so even a kill leaves one
complete output under ``out_dir``. Where the exchange is unsupported, a kill between the fallback's
two renames is put right by the next merge to the same place, which also removes what killed
merges left there (see :mod:`ia3fx.atomic_files`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from .adapter_dirs import _read_config, adapter_file
from .atomic_files import move_into_place, recover_place, settled_view, staging_directory
from .config import CONFIG_NAME
from .offline_format import CheckpointError, SafetensorsHeader, TensorInfo, read_safetensors_header
from .offline_plan import Adapter, NeedsModel, layers_from_names, load_vectors, plan
from .offline_stream import Copier, Progress, check_size, prepare_shard, start_copying, write_planned

__all__ = [
    "CheckpointError",
    "MergeReport",
    "SafetensorsHeader",
    "TensorInfo",
    "merge_checkpoint",
    "read_safetensors_header",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

# Weights of other formats that would sit unmerged beside the merged safetensors: not copied.
_STALE_WEIGHT_PREFIXES = ("pytorch_model", "tf_model", "flax_model")
_STALE_WEIGHT_SUFFIXES = (".bin", ".bin.index.json", ".h5", ".msgpack", ".msgpack.index.json")


# --- report ------------------------------------------------------------------------------------
@dataclass
class MergeReport:
    """What :func:`merge_checkpoint` did."""

    out_dir: str
    tensors_merged: int = 0  # weights and biases folded with a vector
    tensors_replaced: int = 0  # taken from the adapter (modules_to_save copies, saved base layers)
    tensors_copied: int = 0  # everything else, byte for byte
    files_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    layers: int = 0  # adapted layers
    skipped_files: list[str] = field(default_factory=list)
    nonfinite_vectors: list[str] = field(default_factory=list)  # adapter keys of vectors with NaN/inf (warned)

    def summary(self) -> str:
        mb = self.bytes_written / 2**20
        rate = mb / self.seconds if self.seconds > 0 else float("inf")
        text = (
            f"merged {self.layers} layers ({self.tensors_merged} tensors folded, "
            f"{self.tensors_replaced} replaced by the adapter's copies, {self.tensors_copied} copied) "
            f"into {self.out_dir}: {self.files_written} files, {mb:,.1f} MiB in {self.seconds:.2f} s "
            f"({rate:,.0f} MiB/s)"
        )
        if self.skipped_files:
            text += f"; not copied: {', '.join(self.skipped_files)}"
        if self.nonfinite_vectors:
            text += (
                f"; WARNING: {len(self.nonfinite_vectors)} vector(s) hold NaN/inf (first "
                f"{self.nonfinite_vectors[0]}), so do the weights they scale"
            )
        return text


# --- inputs --------------------------------------------------------------------------------------
def _read_adapter(adapter_dir: str) -> Adapter:
    if not os.path.isdir(adapter_dir):
        raise CheckpointError(f"adapter {adapter_dir} is not a directory")
    view = settled_view(adapter_dir)  # an ia3fx save killed midway is finished first (io's docstring)
    config_path = adapter_file(adapter_dir, CONFIG_NAME, view)
    if config_path is None or not os.path.isfile(config_path):
        raise CheckpointError(f"{adapter_dir} is not a PEFT adapter directory: it has no {CONFIG_NAME}")
    config = _read_config(adapter_dir, view)  # refuses a config without peft_type, or of another type
    st = adapter_file(adapter_dir, ADAPTER_WEIGHTS, view)
    if st is not None and os.path.isfile(st):
        header = read_safetensors_header(st)
        return Adapter(config, list(header.tensors), header, None)
    binary = adapter_file(adapter_dir, ADAPTER_BIN, view)
    if binary is not None and os.path.isfile(binary):
        from .io import read_adapter_files

        _, tensors = read_adapter_files(adapter_dir)
        return Adapter(config, list(tensors), None, tensors)
    raise CheckpointError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (or {ADAPTER_BIN})")


def _weight_files(base_dir: str) -> tuple[list[str], str | None, dict[str, str]]:
    """Names of the base's safetensors files, its index file (or ``None``) and the index's map."""
    if not os.path.isdir(base_dir):
        raise CheckpointError(f"base {base_dir} is not a directory")
    single = os.path.isfile(os.path.join(base_dir, SINGLE_FILE))
    index = os.path.join(base_dir, INDEX_FILE)
    if single and os.path.isfile(index):
        raise CheckpointError(
            f"{base_dir} has both {SINGLE_FILE} and {INDEX_FILE}; keep one of them so that it is clear which weights to merge"
        )
    if single:
        return [SINGLE_FILE], None, {}
    if not os.path.isfile(index):
        others = sorted(f for f in os.listdir(base_dir) if f.endswith((".bin", ".safetensors")))
        hint = f" (found {', '.join(others)}; only safetensors checkpoints are supported)" if others else ""
        raise CheckpointError(f"{base_dir} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index (needs a weight_map): {e}") from e
    for shard in shards:
        if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(base_dir, shard)):
            raise CheckpointError(f"{index} names shard {shard!r}, which is not a file in {base_dir}")
    return shards, INDEX_FILE, weight_map


# --- directories --------------------------------------------------------------------------------
def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


MERGE_RECORD = "ia3fx_merge.json"  # marks a directory as a merge output, which --force may replace


def _check_dirs(base: str, adapter: str, out: str, force: bool) -> None:
    for role, src in (("base", base), ("adapter", adapter)):
        if _inside(out, src) or _inside(src, out):
            raise CheckpointError(
                f"the output {out} and the {role} directory {src} overlap; write the merged checkpoint elsewhere"
            )
    cwd = os.path.realpath(os.getcwd())
    if _inside(cwd, out):
        raise CheckpointError(
            f"the output directory {out} is the working directory or holds it; name a new directory for the merge"
        )
    recover_place(out)  # an earlier merge killed while replacing out: finished, its leftovers removed
    if not os.path.lexists(out):
        return
    if not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace it")
    earlier = os.path.isdir(out) and (not os.listdir(out) or os.path.isfile(os.path.join(out, MERGE_RECORD)))
    if not earlier:
        raise CheckpointError(
            f"{out} is not the output of an earlier merge (no {MERGE_RECORD}) nor an empty directory: --force "
            "replaces only those. Name a new directory, or remove this one yourself"
        )


def _write_record(tmp: str, base: str, adapter: str, report: MergeReport) -> None:
    path = os.path.join(tmp, MERGE_RECORD)
    with open(path, "w") as f:
        json.dump({"ia3fx_merge": 1, "base_dir": base, "adapter_dir": adapter, "layers": report.layers}, f, indent=1)
    report.files_written += 1
    report.bytes_written += os.path.getsize(path)


def _other_files(base_dir: str, weights: set[str]) -> tuple[list[str], list[str]]:
    """Relative paths of every other file to copy, and of stale weight files left out."""
    copy, skipped = [], []
    for root, dirs, files in os.walk(base_dir):
        if root == base_dir and ".git" in dirs:
            dirs.remove(".git")  # a git clone's history (with LFS, the weights again) is not the model
            skipped.append(".git/")
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), base_dir)
            if rel in weights:
                continue
            if root == base_dir and name.startswith(_STALE_WEIGHT_PREFIXES) and name.endswith(_STALE_WEIGHT_SUFFIXES):
                skipped.append(rel)
                continue
            copy.append(rel)
    return copy, skipped


def _finish(tmp: str, out: str) -> None:
    """Give ``tmp`` the usual directory permissions (mkdtemp's are private), then move it to ``out``."""
    os.chmod(tmp, 0o777 & ~_umask())
    move_into_place(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- entry point --------------------------------------------------------------------------------
def merge_checkpoint(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool | Callable[[int, int], None] | None = None,
    safe: bool = False,
) -> MergeReport:
    """Write ``out_dir``: ``base_dir`` with the PEFT IA3 adapter of ``adapter_dir`` merged in.

    ``base_dir`` is a transformers model directory (``config.json`` and ``model.safetensors``, or
    shards with ``model.safetensors.index.json``); every other file in it is copied. The result is
    bit-identical to PEFT's ``merge_and_unload()`` followed by ``save_pretrained``, but the model
    is never built with weights: memory stays a few tens of MB above the interpreter.

    ``force`` replaces an existing ``out_dir`` (only once the new one is complete) if it is empty
    or an earlier merge's output (which holds ``ia3fx_merge.json``: the inputs it was made from);
    any other directory, a file, the working directory or one holding it is refused. ``progress``:
    ``None`` shows a tqdm bar on stderr when it is a terminal, ``True``/``False`` force it on/off,
    a callable gets ``(bytes_done, bytes_total)``.

    Adapter vectors holding NaN or inf are warned about (and listed in the report's
    ``nonfinite_vectors``); ``safe=True`` (PEFT's ``safe_merge``) refuses them instead, with a
    :class:`CheckpointError` naming the tensor, before anything is written.

    Raises :class:`CheckpointError` (a ``ValueError``) for inputs that cannot be merged, naming the
    file or tensor, and ``FileExistsError`` for an existing output without ``force``. Nothing is
    written to the inputs, and on any error no output appears.
    """
    t0 = time.perf_counter()
    base = os.path.realpath(os.fspath(base_dir))
    adapter_root = os.path.realpath(os.fspath(adapter_dir))
    if not os.fspath(out_dir).strip():
        raise CheckpointError("the output directory is empty (''): name a new directory for the merged checkpoint")
    out = os.path.realpath(os.fspath(out_dir))
    _check_dirs(base, adapter_root, out, force)

    shards, index, weight_map = _weight_files(base)
    headers = [read_safetensors_header(os.path.join(base, s)) for s in shards]
    tensors: dict[str, TensorInfo] = {}
    shard_of: dict[str, str] = {}
    for shard, h in zip(shards, headers, strict=True):
        for name, info in h.tensors.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is in two shards of {base}: {shard_of[name]} and {shard}")
            tensors[name], shard_of[name] = info, shard
    for name, shard in weight_map.items():
        if shard_of.get(name) != shard:
            raise CheckpointError(
                f"{os.path.join(base, INDEX_FILE)} maps {name!r} to {shard}, but that shard has no such tensor"
            )

    adapter = _read_adapter(adapter_root)
    try:  # from names where they settle it (no torch, no transformers), else from the meta model
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ops, layers, nonfinite = plan(base, adapter, tensors, layers_from_names(base, adapter.config, tensors), safe)
    except NeedsModel:
        from .offline_meta import layers_from_model

        ops, layers, nonfinite = plan(base, adapter, tensors, layers_from_model(base, adapter.config), safe)
    else:
        for w in caught:  # the same warnings the model's plan gives, said once
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    adapter_path = adapter.header.path if adapter.header is not None else None

    others, skipped = _other_files(base, set(shards))
    for rel in skipped:
        why = "a git repository" if rel == ".git/" else "unmerged weights in another format"
        warnings.warn(f"{rel} is not copied: it holds {why}", stacklevel=2)
    total = sum(h.file_size for h in headers) + sum(os.path.getsize(os.path.join(base, r)) for r in others)

    report = MergeReport(out_dir=out, layers=layers, skipped_files=skipped, nonfinite_vectors=nonfinite)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = staging_directory(parent, os.path.basename(out))  # private (0o700) until _finish
    bar = Progress(total, progress)
    counts = {"merged": 0, "replaced": 0, "copied": 0}
    background = None
    try:
        jobs = [prepare_shard(h, os.path.join(tmp, s), ops, bar, counts) for s, h in zip(shards, headers, strict=True)]
        background = start_copying(jobs)  # the untouched bytes, in the kernel, while this thread folds
        vectors = load_vectors(adapter, ops)  # imports numpy: overlaps with the copy
        copier = Copier(bar)
        for job in jobs:
            write_planned(job, vectors, adapter_path, copier, counts, background)
        for rel in others:
            src, dst = os.path.join(base, rel), os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
            size = os.path.getsize(dst)
            bar.update(size)
            report.files_written += 1
            report.bytes_written += size
        background.finish(bar)
        for job in jobs:
            check_size(job)
            report.files_written += 1
            report.bytes_written += job.header.file_size
        report.tensors_merged, report.tensors_replaced = counts["merged"], counts["replaced"]
        report.tensors_copied = counts["copied"]
        _write_record(tmp, base, adapter_root, report)
        _finish(tmp, out)
    except BaseException:
        if background is not None:
            background.cancel()  # its files are about to be removed
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    return report
