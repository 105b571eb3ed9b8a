"""How ia3fx writes files, so that a failure or a kill leaves one complete old or new version.

Two cases: a **set of files** that others read in place (an adapter beside a Trainer checkpoint's
files: :func:`commit_files`), and a **whole output** built apart (the offline merge, the exporters:
:func:`staging_directory`, :func:`move_into_place`). The next write to the same place removes what
a killed one left.

**A set of files: the save journal.** PEFT and transformers read the files directly in the user's
directory, so the set cannot be swapped as one directory, and a set of renames is not atomic:

1. every file is written to a hidden temporary next to its final name and fsynced;
2. ``.ia3fx-save-journal.json`` is written (to a temporary, fsynced, then hard-linked into place:
   it appears complete, and a second one cannot appear) listing the ``(temporary, final)`` pairs,
   and the directory is fsynced. From here on the temporaries are complete files, so rolling
   forward always gives the complete new version;
3. the renames, an fsync of the directory, then the journal is removed.

Whoever next saves into or reads from the directory through ia3fx and finds the journal of a
process that is gone finishes it (renames whatever temporary is still there; idempotent), or, where
the directory cannot be written, reads the new version from the temporaries. A journal of a live
save (its commit is a few renames) is waited for. A kill before step 2 leaves the old files and
stale temporaries. An *exception* during the renames rolls back to the old files, and the rollback
itself is journalled first, so a kill during it still ends in the old version. PEFT reading the
directory *while* such a kill is unfinished can see a mixed pair: that window is closed by the next
ia3fx save or read, not before (nothing in the layout can close it for PEFT).

**Our temporaries** are named ``.<final name>.ia3fx-<host>-<pid>-<token>.<kind>`` (``tmp``,
``bak``; ``partial`` and ``old`` for the outputs of :func:`move_into_place`). A save removes the
``tmp``/``bak`` ones of processes that are gone (:func:`clean_stale_temporaries`), a replacement
the ``partial``/``old`` ones of its final name (:func:`recover_place`); nothing of any other name
is touched. The pid tells whether the writer still runs (a check that costs nothing and is never
wrong in the unsafe direction: a reused pid only delays the cleanup); an age threshold alone would
either delete the temporaries of a slow save or keep 80 MB files for days. ``<host>`` (a hash of
the host name) keeps the pid meaningful: on a filesystem shared between machines or containers, a
pid of another host is not checked, and its temporaries are removed only when untouched for a day.

**A whole output** replaces the old one with Linux's ``renameat2(RENAME_EXCHANGE)``: the old and
new trees swap in one step, so the final name never goes missing; the old tree, now under the
staged name, is then deleted (after a kill, by the next replacement: it is a stale temporary).
Where the exchange is not supported (another OS, NFS, old kernels: ``EINVAL``/``ENOSYS``/``EXDEV``/
``EOPNOTSUPP``) the old output is renamed aside, then the new one in; a kill between the two leaves
no output under the final name, and the next replacement of the same name (or
:func:`recover_place`, which writers call before looking at the final name) puts things right: the
complete staged output is moved in (the aside name shares its token, and the aside rename happens
only once staging is complete), or, without it, the old output is put back.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "JOURNAL_NAME",
    "clean_stale_temporaries",
    "commit_files",
    "discard_staged",
    "finish_interrupted_save",
    "fsync_file",
    "move_into_place",
    "recover_place",
    "settled_view",
    "staging_directory",
    "temp_path",
]

JOURNAL_NAME = ".ia3fx-save-journal.json"
JOURNAL_WAIT_S = 5.0  # how long a save or a read waits for another live process's commit to end
JOURNAL_STALE_S = 60.0  # a journal this old is finished whoever wrote it (a commit takes milliseconds)
FOREIGN_STALE_S = 24 * 3600.0  # temporaries of another host: removed when untouched this long


# --- our temporaries -------------------------------------------------------------------------------
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_OURS = re.compile(
    r"^\.(?P<name>.+)\.ia3fx-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-(?P<token>[0-9a-f]{12})\.(?P<kind>tmp|bak|old|partial)$"
)


def _our_name(name: str, kind: str, token: str | None = None) -> str:
    return f".{name}.ia3fx-{_HOST}-{os.getpid()}-{token or secrets.token_hex(6)}.{kind}"


def _owner_alive(host: str, pid: int) -> bool | None:
    """Whether process ``pid`` of ``host`` still runs; ``None`` for another host (unknowable)."""
    if host != _HOST or os.name != "posix":  # on Windows os.kill(pid, 0) would send CTRL_C_EVENT
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:  # not a pid this system can have
        return None
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _is_stale(path: str, match: re.Match) -> bool:
    alive = _owner_alive(match["host"], int(match["pid"]))
    if alive is None:
        try:
            return time.time() - os.lstat(path).st_mtime > FOREIGN_STALE_S
        except OSError:
            return False
    return not alive


def clean_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Remove the temporary files (``tmp``/``bak``) that saves of processes now gone left in
    ``directory``; returns their names. Only names of our pattern are considered."""
    directory = os.fspath(directory)
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = _OURS.match(entry)
        path = os.path.join(directory, entry)
        if m is None or m["kind"] not in ("tmp", "bak") or os.path.isdir(path) and not os.path.islink(path):
            continue
        if _is_stale(path, m):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError:
                continue  # not ours to remove after all (permissions): leave it
            removed.append(entry)
    return removed


# --- writing -----------------------------------------------------------------------------------
def _fresh(directory: str, name: str, kind: str, make: Callable[[str], None]) -> str:
    """A new name of our pattern in ``directory``, made by ``make`` (``FileExistsError``: taken)."""
    for _ in range(100):
        path = os.path.join(directory, _our_name(name, kind))
        try:
            make(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name for {name} in {directory}")


def _create(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _unused(path: str) -> None:
    if os.path.lexists(path):
        raise FileExistsError(path)


def temp_path(directory: str | os.PathLike, name: str, create: bool = True, kind: str = "tmp") -> str:
    """A fresh hidden name of our pattern next to the final file ``name``. Created with mode 0o666
    minus the umask (as ``open`` would), not ``mkstemp``'s 0o600, so the renamed file gets the usual
    permissions."""
    return _fresh(os.fspath(directory), name, kind, _create if create else _unused)


def staging_directory(parent: str, name: str) -> str:
    """A new private directory ``.<name>.ia3fx-<host>-<pid>-<token>.partial`` in ``parent``, to
    build a whole output in before :func:`move_into_place`; a kill leaves it to the cleanup of the
    next replacement of ``name`` (:func:`recover_place`)."""
    return _fresh(parent, name, "partial", lambda path: os.mkdir(path, 0o700))


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: str) -> None:
    """Make the directory's entries (creations, renames) durable; a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: str | None) -> None:
    if path and os.path.lexists(path):
        os.remove(path)


def discard_staged(staged: list[tuple[str, str]]) -> None:
    """Remove the temporaries of ``(temporary, final)`` pairs that are not (or no longer) to be committed."""
    for tmp, _ in staged:
        _remove(tmp)


def _backup(final: str, directory: str) -> str | None:
    """A second name for the current ``final`` (a hard link, or a copy where links fail)."""
    if not os.path.exists(final):
        return None
    backup = temp_path(directory, os.path.basename(final), create=False, kind="bak")
    try:
        os.link(final, backup)
    except OSError:
        shutil.copy2(final, backup)
    return backup


# --- the save journal ------------------------------------------------------------------------------
_ACTIVE: set[str] = set()  # journals this process is committing right now (other threads wait for them)
_ACTIVE_LOCK = threading.Lock()


def _journal_path(directory: str) -> str:
    return os.path.join(directory, JOURNAL_NAME)


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..", JOURNAL_NAME) and "/" not in name and os.sep not in name


def _read_journal(path: str) -> dict | None:
    """The journal at ``path``, ``None`` if there is none, ``{}`` if it is not one of ours.

    A journal names only files of the directory: finals by plain name, sources of our temporary
    pattern; anything else (a hand-made or damaged file) is not replayed."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    try:
        ok = (
            data["ia3fx_save_journal"] == 1
            and isinstance(data["host"], str)
            and isinstance(data["pid"], int)
            and all(
                len(pair) == 2 and _plain_name(pair[1]) and (pair[0] is None or _OURS.match(pair[0]) is not None)
                for pair in data["renames"]
            )
        )
    except (KeyError, TypeError):
        ok = False
    return data if ok else {}


def _journal_live(path: str, data: dict) -> bool:
    """Whether the save that wrote this journal may still be committing."""
    if data["host"] == _HOST and data["pid"] == os.getpid():
        with _ACTIVE_LOCK:
            return os.path.abspath(path) in _ACTIVE
    try:
        if time.time() - os.lstat(path).st_mtime > JOURNAL_STALE_S:
            return False  # stopped or a reused pid: finishing it is safe (it would fail its next rename and roll back)
    except OSError:
        return False
    alive = _owner_alive(data["host"], data["pid"])
    return True if alive is None else alive


def _write_journal(directory: str, renames: list[list[str | None]], exclusive: bool) -> None:
    """Write the journal complete under a temporary name, fsync it, then put it in place:
    ``exclusive`` with a hard link (``FileExistsError`` if a journal is there), else replacing."""
    tmp = temp_path(directory, JOURNAL_NAME)
    path = _journal_path(directory)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"ia3fx_save_journal": 1, "host": _HOST, "pid": os.getpid(), "renames": renames}, f)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links on this filesystem: check, then rename (not exclusive)
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, "a save journal is already there", path) from None
                os.rename(tmp, path)
    finally:
        _remove(tmp)
    _fsync_dir(directory)


def _replay(directory: str, renames: list) -> None:
    """Do a journal's renames; a source already gone was renamed before (they are idempotent)."""
    for src, dst in renames:
        final = os.path.join(directory, dst)
        try:
            if src is None:
                os.remove(final)  # a rollback: the file did not exist before the save
            else:
                os.replace(os.path.join(directory, src), final)
        except FileNotFoundError:
            pass
    _fsync_dir(directory)


def _end_journal(directory: str) -> None:
    try:
        os.remove(_journal_path(directory))
    except FileNotFoundError:
        pass
    _fsync_dir(directory)


def _staged_view(directory: str, renames: list) -> dict[str, str | None]:
    """What the directory holds once the journal is finished, without writing: final name -> the
    path to read it from (``None``: absent). Names not listed are read where they are."""
    view: dict[str, str | None] = {}
    for src, dst in renames:
        if src is None:
            view[dst] = None
        elif os.path.lexists(os.path.join(directory, src)):
            view[dst] = os.path.join(directory, src)
    return view


def finish_interrupted_save(directory: str | os.PathLike, *, reading: bool = False) -> dict[str, str | None]:
    """Finish a save into ``directory`` that was killed during its renames (see the module
    docstring), or wait (``JOURNAL_WAIT_S``) for one still running in another process.

    Returns ``{}`` once the directory holds one complete version. With ``reading``, where the
    directory cannot be written (or a live save's journal outlasts the wait), returns instead the
    files to read in place of the visible ones; without it, those cases raise ``OSError``."""
    directory = os.fspath(directory)
    path = _journal_path(directory)
    deadline = None
    while True:
        data = _read_journal(path)
        if data is None:
            return {}
        if not data:  # not a journal we can trust: never replayed
            if not reading:
                raise FileExistsError(
                    errno.EEXIST, f"not a readable ia3fx save journal; remove it to save into {directory}", path
                )
            return {}
        if _journal_live(path, data):
            if deadline is None:
                deadline = time.monotonic() + JOURNAL_WAIT_S
            if time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            if reading:
                return _staged_view(directory, data["renames"])
            raise BlockingIOError(
                errno.EAGAIN,
                f"another process (pid {data['pid']}) is saving into {directory}: its journal is still there "
                f"after {JOURNAL_WAIT_S} s",
                path,
            )
        try:
            _replay(directory, data["renames"])
            _end_journal(directory)
        except OSError:
            if not reading:
                raise
            return _staged_view(directory, data["renames"])
        return {}


def _begin_commit(directory: str, renames: list[list[str | None]]) -> None:
    """Write this save's journal (once no other save's is there), marked live for our threads."""
    key = os.path.abspath(_journal_path(directory))
    with _ACTIVE_LOCK:
        _ACTIVE.add(key)
    try:
        for attempt in range(1000):
            finish_interrupted_save(directory)  # a dead save's journal is finished, a live one waited for
            try:
                _write_journal(directory, renames, exclusive=True)
                return
            except FileExistsError:
                if attempt == 999:
                    raise
    except BaseException:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(key)
        raise


def _ours_now(directory: str, renames: list) -> bool:
    data = _read_journal(_journal_path(directory))
    return bool(data) and data["pid"] == os.getpid() and data["host"] == _HOST and data["renames"] == renames


def _roll_back(directory: str, staged: list[tuple[str, str]], backups: list[tuple[str, str | None]], done: list[int]) -> None:
    """Put back the files the first ``done`` renames replaced. The rollback is journalled first
    (replacing the forward journal), so that a kill during it still ends in the old version."""
    rollback = [
        [os.path.basename(backups[i][1]) if backups[i][1] else None, os.path.basename(backups[i][0])]
        for i in reversed(done)
    ]
    try:
        _write_journal(directory, rollback, exclusive=False)
    except Exception:  # noqa: BLE001 - a full disk: roll back all the same
        pass
    _replay(directory, rollback)
    discard_staged(staged)
    _fsync_dir(directory)
    _end_journal(directory)


def commit_files(staged: list[tuple[str, str]], directory: str) -> None:
    """Rename every staged ``(temporary, final)`` file of ``directory`` (complete and fsynced:
    :func:`temp_path`, :func:`fsync_file`) into place under the journal; on an exception put the
    previous files back. The temporaries are gone afterwards, either way."""
    key = os.path.abspath(_journal_path(directory))
    renames: list[list[str | None]] = [[os.path.basename(t), os.path.basename(f)] for t, f in staged]
    backups: list[tuple[str, str | None]] = []
    done: list[int] = []
    try:
        for _, final in staged:
            backups.append((final, _backup(final, directory)))
        try:
            _begin_commit(directory, renames)
        except BaseException:
            if _ours_now(directory, renames):  # interrupted right after it wrote the journal
                _roll_back(directory, staged, backups, done)
            raise
        try:
            for i, (tmp, final) in enumerate(staged):
                os.replace(tmp, final)
                done.append(i)
            _fsync_dir(directory)
        except BaseException:
            _roll_back(directory, staged, backups, done)
            raise
        _end_journal(directory)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(key)
        for _, backup in backups:
            _remove(backup)
        discard_staged(staged)


def settled_view(directory: str) -> dict[str, str | None]:
    """Before reading ``directory``: finish a save there that a kill interrupted, so that it holds
    one complete version; where it cannot be written, the staged files to read instead (final
    name -> the path to read, ``None``: absent; a name not listed is read where it is)."""
    try:
        return finish_interrupted_save(directory, reading=True)
    except OSError:
        return {}


# --- replacing a whole file or directory -------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276}
_EXCHANGE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP}
_renameat2_fn: Callable[..., int] | None | bool = False  # False: not looked up yet


def _renameat2() -> Callable[..., int] | None:
    """libc's ``renameat2`` (glibc >= 2.28), else the raw system call, else ``None``."""
    global _renameat2_fn
    if _renameat2_fn is False:
        _renameat2_fn = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
            except OSError:
                libc = None
            fn = getattr(libc, "renameat2", None) if libc is not None else None
            if fn is not None:
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2_fn = fn
            else:
                _renameat2_fn = _syscall_renameat2(libc)
    return _renameat2_fn  # type: ignore[return-value]


def _syscall_renameat2(libc: Any) -> Callable[..., int] | None:
    nr = _SYS_RENAMEAT2.get(platform.machine().lower())
    syscall = getattr(libc, "syscall", None) if libc is not None else None
    if nr is None or syscall is None:
        return None
    syscall.restype = ctypes.c_long

    def call(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> int:
        return syscall(ctypes.c_long(nr), ctypes.c_int(olddirfd), ctypes.c_char_p(old), ctypes.c_int(newdirfd),
                       ctypes.c_char_p(new), ctypes.c_uint(flags))

    return call


def _exchange(a: str, b: str) -> None:
    """Swap the names ``a`` and ``b`` in one step (``renameat2(RENAME_EXCHANGE)``); both exist."""
    fn = _renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here", a)
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a, None, b)


def _discard(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


def recover_place(final: str | os.PathLike) -> None:
    """Put right what a killed :func:`move_into_place` of ``final`` left (a process that is gone):
    with nothing under ``final`` but an old output renamed aside, move in the complete staged output
    that goes with it (same token), or else put the old one back; then remove the other leftovers
    (``.<name>.ia3fx-*.partial`` / ``.old``). Entries of live processes are left alone."""
    final = os.fspath(final)
    parent, name = os.path.dirname(final) or ".", os.path.basename(final)
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return
    stale: dict[str, re.Match] = {}
    for entry in entries:
        m = _OURS.match(entry)
        if m is not None and m["name"] == name and m["kind"] in ("old", "partial"):
            if _is_stale(os.path.join(parent, entry), m):
                stale[entry] = m
    if not os.path.lexists(final):
        for entry, m in stale.items():
            if m["kind"] != "old":
                continue
            partial = f".{name}.ia3fx-{m['host']}-{m['pid']}-{m['token']}.partial"
            src = partial if partial in stale else entry  # renamed aside only once staging was complete
            os.rename(os.path.join(parent, src), final)
            del stale[src]
            break
    for entry in stale:
        _discard(os.path.join(parent, entry))


def move_into_place(staged: str, final: str) -> None:
    """Put ``staged`` (a file or a directory) at ``final``, replacing what is there in one step
    where the OS can (``renameat2(RENAME_EXCHANGE)``; the old one is then removed). Elsewhere the
    existing ``final`` is renamed aside first and removed only once the rename succeeded; if that
    fails, it is put back, and after a kill between the two the next call for ``final`` (or
    :func:`recover_place`) puts things right. Shared by the exporters and the offline merge."""
    parent = os.path.dirname(final) or "."
    recover_place(final)
    if not os.path.lexists(final):
        os.rename(staged, final)
        return
    try:
        _exchange(staged, final)
    except OSError as e:
        if e.errno not in _EXCHANGE_UNSUPPORTED:
            raise
    else:
        _discard(staged)  # the old output, now under the staged name
        return
    m = _OURS.match(os.path.basename(staged))
    mine = (
        m is not None and m["kind"] == "partial" and os.path.dirname(staged) == parent
        and m["host"] == _HOST and int(m["pid"]) == os.getpid()
    )
    old = os.path.join(parent, _our_name(os.path.basename(final), "old", m["token"] if mine else None))
    if os.path.lexists(old):
        old = os.path.join(parent, _our_name(os.path.basename(final), "old"))
    os.rename(final, old)
    try:
        os.rename(staged, final)
    except BaseException:
        os.rename(old, final)
        raise
    _discard(old)

