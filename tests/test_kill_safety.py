"""Nothing lost (issue 12): saves and forced offline merges killed (SIGKILL) at any point leave one
complete old or new version, their leftovers are removed by the next save or merge (and only
ours, and only of processes that are gone), and NaN/inf vectors are warned about or refused.

A kill is a forked child (it inherits the imported modules, so it costs milliseconds) that runs
the save or merge with a rename patched to ``SIGKILL`` the child at a chosen point.
"""

from __future__ import annotations

import copy
import errno
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback

import pytest
import torch
from conftest import custom_model, saved_base_and_adapter, snapshot
from safetensors.torch import load_file, save_file

import ia3fx
import ia3fx.atomic_files as atomic
import ia3fx.io as ia3io
from ia3fx.offline import MERGE_RECORD, CheckpointError, merge_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")

VERSIONS = {"old": ("v-old", 1.5), "new": ("v-new", 2.5), "third": ("v-third", 3.5)}
USER_FILES = {"trainer_state.json": b'{"global_step": 7}', ".notes.tmp": b"mine", "optimizer.pt": b"\x00" * 64}


def killed_child(run) -> None:
    """Run ``run()`` in a forked child that must end by SIGKILL (it kills itself)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 3
        try:
            run()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child ended with status {status}"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_rename(k: int, name: str = "replace") -> None:
    """In the child: ``os.<name>`` kills the process before the first rename (k=0) or after the k-th."""
    real = getattr(os, name)
    count = [0]

    def rename(src, dst, *args, **kwargs):
        if k == 0:
            die()
        real(src, dst, *args, **kwargs)
        count[0] += 1
        if count[0] == k:
            die()

    setattr(os, name, rename)


def ours(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if atomic._OURS.match(n) or n == atomic.JOURNAL_NAME)


# --- adapter saves --------------------------------------------------------------------------------
def adapter_model():
    return ia3fx.get_ia3_model(custom_model("MLP"), ia3fx.IA3Config(target_modules=["lin0"], feedforward_modules=[]))


def set_version(model, version: str) -> None:
    revision, value = VERSIONS[version]
    model.peft_config["default"].revision = revision
    with torch.no_grad():
        for p in model.ia3_l["default"].parameters():
            p.fill_(value)


def version_of(config, tensors) -> str:
    values = {float(v) for t in tensors.values() for v in t.flatten()}
    got = [name for name, (revision, value) in VERSIONS.items() if config.revision == revision]
    assert len(got) == 1 and values == {VERSIONS[got[0]][1]}, f"mixed: revision {config.revision}, vectors {values}"
    return got[0]


def visible_version(directory) -> str:
    """The version the files show to PEFT or transformers (plain reads, no ia3fx logic): config,
    adapter weights and Trainer's copy must agree."""
    config = ia3fx.IA3Config.from_dict(json.loads((directory / "adapter_config.json").read_text()))
    tensors = {**load_file(directory / "adapter_model.safetensors"), **load_file(directory / "model.safetensors")}
    return version_of(config, tensors)


@pytest.fixture
def saved(tmp_path):
    """A Trainer-style checkpoint directory (3 files of ours) with user files, and the model at 'new'."""
    directory = tmp_path / "checkpoint-7"
    model = adapter_model()
    set_version(model, "old")
    model.save_pretrained(directory, is_main_process=True)  # adapter files + model.safetensors
    for name, data in USER_FILES.items():
        (directory / name).write_bytes(data)
    set_version(model, "new")
    return model, directory


def assert_clean(directory) -> None:
    assert sorted(os.listdir(directory)) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "model.safetensors", *USER_FILES]
    )
    assert {n: (directory / n).read_bytes() for n in USER_FILES} == USER_FILES


@pytest.mark.parametrize("point", ["writing", 0, 1, 2, 3], ids=lambda p: f"after-{p}-renames" if p != "writing" else p)
def test_a_save_killed_at_any_point_is_one_version(saved, point):
    model, directory = saved

    def child():
        if point == "writing":  # the first temporary is written, the second one not yet
            real = ia3io.fsync_file
            calls = []

            def fsync(path):
                calls.append(path)
                if len(calls) == 2:
                    die()
                real(path)

            ia3io.fsync_file = fsync
        else:
            kill_at_rename(point)
        model.save_pretrained(directory, is_main_process=True)

    killed_child(child)
    left = ours(directory)
    assert (atomic.JOURNAL_NAME in left) == (point != "writing")
    assert len(left) >= 2  # temporaries or backups of the killed save
    expected = "old" if point == "writing" else "new"  # a journal present: rolled forward to the new one
    assert version_of(*ia3io.read_adapter_files(directory)) == expected
    assert visible_version(directory) == expected  # the read finished the journal: PEFT sees it too
    assert atomic.JOURNAL_NAME not in os.listdir(directory)
    assert {n: (directory / n).read_bytes() for n in USER_FILES} == USER_FILES
    loaded = ia3fx.IA3Model.from_pretrained(custom_model("MLP"), directory)
    assert version_of(loaded.peft_config["default"], loaded.adapter_state_dict()) == expected
    set_version(model, "third")
    model.save_pretrained(directory, is_main_process=True)  # cleans the killed save's leftovers
    assert_clean(directory)
    assert visible_version(directory) == "third"


def test_a_killed_save_is_finished_by_the_next_save(saved):
    model, directory = saved
    killed_child(lambda: (kill_at_rename(1), model.save_pretrained(directory, is_main_process=True)))
    set_version(model, "third")
    model.save_pretrained(directory, is_main_process=True)
    assert_clean(directory)
    assert visible_version(directory) == "third"


def test_a_killed_save_reads_as_the_new_version_where_the_directory_is_read_only(saved, monkeypatch):
    model, directory = saved
    killed_child(lambda: (kill_at_rename(1), model.save_pretrained(directory, is_main_process=True)))
    before = snapshot(directory)

    def read_only(*args):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic, "_replay", read_only)  # tests run as root: chmod would not stop writes
    assert version_of(*ia3io.read_adapter_files(directory)) == "new"  # from the staged files
    assert snapshot(directory) == before  # nothing written
    from ia3fx.offline import _read_adapter

    adapter = _read_adapter(str(directory))  # the offline merge reads through the same view
    assert adapter.config.revision == "v-new"
    assert {float(v) for v in adapter.load("base_model.model.lin0.ia3_l").flatten()} == {2.5}
    monkeypatch.undo()
    assert version_of(*ia3io.read_adapter_files(directory)) == "new"
    assert visible_version(directory) == "new"


def test_a_save_that_fails_then_is_killed_while_rolling_back_is_the_old_version(saved):
    """An exception during the renames rolls back; the rollback is journalled, so a kill in its
    middle still ends in the old version."""
    model, directory = saved

    def child():
        real = os.replace
        calls = []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:  # the second file's rename fails: roll back
                raise OSError(errno.EIO, "I/O error (simulated)")
            if len(calls) == 4:  # 3 = the rollback journal, 4 = putting the first file back
                die()
            real(src, dst)

        os.replace = replace
        model.save_pretrained(directory, is_main_process=True)

    killed_child(child)
    journal = json.loads((directory / atomic.JOURNAL_NAME).read_text())
    assert [dst for _, dst in journal["renames"]] == ["adapter_model.safetensors"]  # the rollback's
    assert version_of(*ia3io.read_adapter_files(directory)) == "old"
    assert visible_version(directory) == "old"
    model.save_pretrained(directory, is_main_process=True)
    assert_clean(directory)
    assert visible_version(directory) == "new"


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_saves_journal_is_waited_for_then_read_staged(saved, sleeper, monkeypatch):
    model, directory = saved
    killed_child(lambda: (kill_at_rename(1), model.save_pretrained(directory, is_main_process=True)))
    journal = directory / atomic.JOURNAL_NAME
    data = json.loads(journal.read_text())
    data["pid"] = sleeper.pid  # as if the save were still running in another process
    journal.write_text(json.dumps(data))
    monkeypatch.setattr(atomic, "JOURNAL_WAIT_S", 0.2)
    before = snapshot(directory)
    assert version_of(*ia3io.read_adapter_files(directory)) == "new"  # waited, then the staged files
    assert snapshot(directory) == before  # a live save's journal is not touched
    with pytest.raises(BlockingIOError, match=f"another process \\(pid {sleeper.pid}\\) is saving"):
        model.save_pretrained(directory, is_main_process=True)
    assert snapshot(directory) == before
    sleeper.kill()
    sleeper.wait()
    set_version(model, "third")
    model.save_pretrained(directory, is_main_process=True)
    assert_clean(directory)
    assert visible_version(directory) == "third"


def test_only_our_temporaries_of_processes_that_are_gone_are_removed(saved, sleeper):
    model, directory = saved
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    tag = lambda host, pid, kind="tmp": f".adapter_model.safetensors.ia3fx-{host}-{pid}-0123456789ab.{kind}"  # noqa: E731
    other_host = "ffffffff" if atomic._HOST != "ffffffff" else "00000000"
    live, dead = tag(atomic._HOST, sleeper.pid), tag(atomic._HOST, done.pid)
    dead_backup = tag(atomic._HOST, done.pid, "bak")
    foreign_fresh, foreign_old = tag(other_host, 1), tag(other_host, 2)
    lookalikes = [
        ".adapter_model.safetensors.tmp",
        ".adapter_model.safetensors.0123456789ab.tmp",  # ia3fx < this version: no pid, left alone
        f"adapter_model.safetensors.ia3fx-{atomic._HOST}-{done.pid}-0123456789ab.tmp",  # not hidden
        f".adapter_model.safetensors.ia3fx-{atomic._HOST}-{done.pid}-0123456789ab.tmp.keep",
    ]
    for name in [live, dead, dead_backup, foreign_fresh, foreign_old, *lookalikes]:
        (directory / name).write_bytes(b"x" * 1000)
    day_ago = os.path.getmtime(directory / foreign_old) - 2 * atomic.FOREIGN_STALE_S
    os.utime(directory / foreign_old, (day_ago, day_ago))
    model.save_pretrained(directory, is_main_process=True)
    names = set(os.listdir(directory))
    assert {live, foreign_fresh, *lookalikes} <= names
    assert not {dead, dead_backup, foreign_old} & names
    sleeper.kill()
    sleeper.wait()
    model.save_pretrained(directory, is_main_process=True)
    assert live not in os.listdir(directory)
    assert {n: (directory / n).read_bytes() for n in USER_FILES} == USER_FILES


def test_a_journal_that_is_not_ours_is_never_replayed(saved):
    model, directory = saved
    before = snapshot(directory)
    (directory / atomic.JOURNAL_NAME).write_text(json.dumps(
        {"ia3fx_save_journal": 1, "host": "ffffffff", "pid": 1, "renames": [["trainer_state.json", "../escaped"]]}
    ))
    assert version_of(*ia3io.read_adapter_files(directory)) == "old"
    assert snapshot(directory) == {**before, atomic.JOURNAL_NAME: (directory / atomic.JOURNAL_NAME).read_bytes()}
    with pytest.raises(FileExistsError, match="not a readable ia3fx save journal"):
        model.save_pretrained(directory, is_main_process=True)
    assert not (directory.parent / "escaped").exists()


# --- replacing a whole output: the offline merge and the exporters ---------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    """base, adapter A, adapter B (other vectors), the earlier merge of A at out, and B's merge."""
    base, adapter = saved_base_and_adapter(tmp_path)
    other = tmp_path / "adapter-b"
    shutil.copytree(adapter, other)
    tensors = load_file(other / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in tensors.items()}, other / "adapter_model.safetensors")
    out, ref = tmp_path / "out", tmp_path / "ref"
    merge_checkpoint(base, adapter, out, progress=False)
    merge_checkpoint(base, other, ref, progress=False)
    old, new = snapshot(out), snapshot(ref)
    assert old != new and old[MERGE_RECORD] != new[MERGE_RECORD]
    return base, adapter, other, out, old, new


KILLS = {  # how the child dies: (exchange supported, kill)
    "exchange-killed-before": (True, 0),
    "exchange-killed-after": (True, 1),
    "fallback-killed-after-aside": (False, 1),
    "fallback-killed-after-both": (False, 2),
}


@pytest.mark.parametrize("how", list(KILLS))
def test_a_forced_merge_killed_while_replacing(checkpoint, how):
    base, adapter, other, out, old, new = checkpoint
    exchange, k = KILLS[how]
    entries = sorted(os.listdir(out.parent))

    def child():
        if exchange:
            real = atomic._exchange

            def killing_exchange(a, b):
                if k == 0:
                    die()
                real(a, b)
                die()

            atomic._exchange = killing_exchange
        else:
            def unsupported(a, b):
                raise OSError(errno.EINVAL, "Invalid argument")

            atomic._exchange = unsupported
            kill_at_rename(k, "rename")
        merge_checkpoint(base, other, out, force=True, progress=False)

    killed_child(child)
    assert set(os.listdir(out.parent)) - set(entries)  # the killed merge left a staged or an aside tree
    if how == "fallback-killed-after-aside":
        assert not out.exists()  # the one window of the fallback: put right by the next merge
    else:
        assert snapshot(out) == (old if how == "exchange-killed-before" else new)
    atomic.recover_place(out)  # what the next merge (or export) to out does first
    assert snapshot(out) == (old if how == "exchange-killed-before" else new)
    assert sorted(os.listdir(out.parent)) == entries  # the killed merge's leftovers are gone
    merge_checkpoint(base, adapter, out, force=True, progress=False)
    assert snapshot(out) == old and sorted(os.listdir(out.parent)) == entries


def kill_a_fallback_merge(base, adapter, out) -> None:
    """A forced merge where the filesystem cannot exchange, killed after its first rename (the
    old output set aside): nothing is left under ``out``."""

    def child():
        atomic._exchange = lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no renameat2"))
        kill_at_rename(1, "rename")
        merge_checkpoint(base, adapter, out, force=True, progress=False)

    killed_child(child)
    assert not out.exists()


def test_the_next_merge_recovers_a_killed_fallback_by_itself(checkpoint):
    base, adapter, other, out, old, new = checkpoint
    entries = sorted(os.listdir(out.parent))

    kill_a_fallback_merge(base, other, out)
    with pytest.raises(FileExistsError, match="--force"):  # the killed merge was finished: out is B's
        merge_checkpoint(base, adapter, out, progress=False)
    assert snapshot(out) == new and sorted(os.listdir(out.parent)) == entries


def test_fallback_puts_the_old_output_back_without_a_complete_new_one(tmp_path):
    """An exporter's staged output (not of our naming) is not known to be complete: the old comes back."""
    final, staged = tmp_path / "export", tmp_path / "work" / "export"
    final.mkdir()
    (final / "model.pt2").write_text("old")
    staged.mkdir(parents=True)
    (staged / "model.pt2").write_text("new")

    def child():
        atomic._exchange = lambda a, b: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device"))
        kill_at_rename(1, "rename")
        atomic.move_into_place(str(staged), str(final))

    killed_child(child)
    assert not final.exists()
    atomic.recover_place(final)
    assert snapshot(final) == {"model.pt2": b"old"} and sorted(os.listdir(tmp_path)) == ["export", "work"]


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_move_into_place_swaps_in_one_step(tmp_path, kind, monkeypatch):
    final, staged = tmp_path / "out", tmp_path / "staged"
    for path, text in ((final, "old"), (staged, "new")):
        if kind == "directory":
            path.mkdir()
            (path / "f").write_text(text)
        else:
            path.write_text(text)
    renames = []
    monkeypatch.setattr(os, "rename", lambda *a: renames.append(a))  # the fallback would show here
    atomic.move_into_place(str(staged), str(final))
    assert renames == []
    assert (final / "f" if kind == "directory" else final).read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_renameat2_through_the_raw_system_call(tmp_path):
    """The fallback for a libc without ``renameat2`` (glibc < 2.28, some musl builds)."""
    import ctypes
    import platform

    if platform.machine().lower() not in atomic._SYS_RENAMEAT2:
        pytest.skip(f"no renameat2 number for {platform.machine()}")
    call = atomic._syscall_renameat2(ctypes.CDLL(None, use_errno=True))
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").mkdir()
    assert call(atomic._AT_FDCWD, os.fsencode(tmp_path / "a"), atomic._AT_FDCWD, os.fsencode(tmp_path / "b"),
                atomic._RENAME_EXCHANGE) == 0
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").read_text() == "a"


# --- the exporters and the config save: our temporaries too ---------------------------------------
def dead_pid() -> int:
    """The pid of a process that has ended (a forked child that exits at once)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def leftover(parent, name: str, pid: int, kind: str = "partial"):
    """A temporary of our pattern for ``name`` that a killed write of process ``pid`` left."""
    path = parent / f".{name}.ia3fx-{atomic._HOST}-{pid}-0123456789ab.{kind}"
    path.mkdir()
    (path / "model.pt2").write_bytes(b"half-written")
    return path.name


def killed_leftovers(parent, name: str) -> list[str]:
    """The hidden entries a killed write left in ``parent``: exactly one, a staging directory of ours."""
    names = [n for n in os.listdir(parent) if n.startswith(".")]
    assert len(names) == 1, names
    m = atomic._OURS.match(names[0])
    assert m is not None and (m["name"], m["kind"], m["host"]) == (name, "partial", atomic._HOST), names
    return names


def test_a_killed_export_is_cleaned_by_the_next_export_to_the_same_place(tmp_path, sleeper):
    from conftest import custom_input

    model, x = adapter_model(), custom_input().float()
    out = tmp_path / "mlp.pt2"
    exporter = importlib.import_module("ia3fx.export")  # ia3fx.export is also the function

    def child():
        exporter.exported_program = lambda *a, **k: die()  # killed once its staging directory exists
        ia3fx.export(model, out, "pt2", example_inputs=(x,))

    killed_child(child)
    killed = killed_leftovers(tmp_path, out.name)
    live = leftover(tmp_path, out.name, sleeper.pid)  # an export still running in another process
    other = leftover(tmp_path, "other.pt2", dead_pid())  # another output's: not this export's to remove
    lookalike = tmp_path / ".mlp.pt2.partial-abc123"  # ia3fx < this version (mkdtemp): not our pattern
    lookalike.mkdir()
    ia3fx.export(model, out, "pt2", example_inputs=(x,))
    names = set(os.listdir(tmp_path))
    assert out.name in names and not set(killed) & names
    assert {live, other, lookalike.name} <= names
    assert torch.export.load(out).module() is not None


def test_a_killed_swap_is_cleaned_by_the_next_swap_to_the_same_place(saved, tmp_path, sleeper):
    _, adapter = saved
    src, out = tmp_path / "export", tmp_path / "swapped"
    src.mkdir()
    (src / "model.pt2").write_bytes(b"a program")  # never read: the child stops before, the refusal too
    swapper = importlib.import_module("ia3fx.swap")

    def child():
        swapper._load = lambda path, fmt: (None, {})
        swapper._new_vectors = lambda *a: {}
        swapper._write_pt2 = lambda *a, **k: die()  # killed while writing into its staging directory
        ia3fx.swap_adapter(src, adapter, out)

    killed_child(child)
    killed = killed_leftovers(tmp_path, out.name)
    live = leftover(tmp_path, out.name, sleeper.pid)
    out.mkdir()
    (out / "model.pt2").write_bytes(b"an earlier swap")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="already exists"):
        ia3fx.swap_adapter(src, adapter, out)  # refused, but the killed swap's staging is removed first
    names = set(os.listdir(tmp_path))
    assert not set(killed) & names and live in names
    assert snapshot(out) == before


def test_a_killed_config_save_leaves_our_temporary_which_the_next_save_removes(saved):
    model, directory = saved
    before = snapshot(directory)
    config = copy.deepcopy(model.peft_config["default"])
    killed_child(lambda: (kill_at_rename(0), config.save_pretrained(directory)))
    left = ours(directory)
    assert len(left) == 1 and snapshot(directory) == {**before, left[0]: config.to_json_string().encode()}
    m = atomic._OURS.match(left[0])
    assert (m["name"], m["kind"]) == ("adapter_config.json", "tmp")  # not a fixed <path>.tmp
    model.save_pretrained(directory, is_main_process=True)  # removes the temporaries of processes gone
    assert_clean(directory)


@pytest.mark.parametrize("writer", ["export", "swap_adapter"])
def test_a_refused_export_sees_the_place_a_killed_merge_left_recovered(checkpoint, tmp_path, writer):
    """Without ``overwrite``, an export to where a killed fallback merge left nothing under the
    final name recovers the place first: the merge's output is back, so the export is refused
    (rather than finding no output, going on, and replacing the recovered one)."""
    base, adapter, other, out, old, new = checkpoint
    entries = sorted(os.listdir(out.parent))

    kill_a_fallback_merge(base, other, out)
    with pytest.raises(FileExistsError, match="already exists"):
        if writer == "export":
            ia3fx.export(adapter_model(), out, "pt2")
        else:
            src = tmp_path / "exported"
            src.mkdir()
            (src / "model.pt2").write_bytes(b"a program")
            ia3fx.swap_adapter(src, adapter, out)
    assert snapshot(out) == new  # the killed merge's complete output, moved in
    assert sorted(n for n in os.listdir(out.parent) if n != "exported") == entries


# --- NaN / inf vectors in the offline merge ------------------------------------------------------
def _broken_adapter(adapter, tmp_path):
    bad = tmp_path / "adapter-nan"
    shutil.copytree(adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    keys = sorted(tensors)
    tensors[keys[1]][0] = float("nan")
    tensors[keys[3]][-1] = float("-inf")
    save_file(tensors, bad / "adapter_model.safetensors")
    return bad, [keys[1], keys[3]]


def test_nan_vectors_are_refused_with_safe_before_anything_is_written(checkpoint, tmp_path):
    base, adapter, _, out, old, _ = checkpoint
    bad, keys = _broken_adapter(adapter, tmp_path)
    entries = sorted(os.listdir(tmp_path))
    for target, force in ((tmp_path / "fresh", False), (out, True)):
        named = "|".join(re.escape(k) for k in keys)
        with pytest.raises(CheckpointError, match=f"adapter tensor '({named})' holds NaN or infinite values: refused"):
            merge_checkpoint(base, bad, target, force=force, safe=True, progress=False)
        assert sorted(os.listdir(tmp_path)) == entries  # no output, no temporary
    assert snapshot(out) == old
    report = merge_checkpoint(base, adapter, tmp_path / "clean", safe=True, progress=False)  # finite: merged
    assert report.nonfinite_vectors == []


def test_nan_vectors_are_warned_and_reported_without_safe(checkpoint, tmp_path):
    base, adapter, _, _, _, _ = checkpoint
    bad, keys = _broken_adapter(adapter, tmp_path)
    named = "|".join(re.escape(k) for k in keys)
    with pytest.warns(UserWarning, match=rf"2 adapter vector\(s\) hold NaN or infinite values \(first '({named})'\)"):
        report = merge_checkpoint(base, bad, tmp_path / "merged", progress=False)
    assert sorted(report.nonfinite_vectors) == keys
    assert "2 vector(s) hold NaN/inf" in report.summary()
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert not all(bool(torch.isfinite(t).all()) for t in merged.values())


def test_the_command_line_merge_takes_safe(checkpoint, tmp_path, capsys):
    from ia3fx.cli import main

    base, adapter, _, _, _, _ = checkpoint
    bad, _ = _broken_adapter(adapter, tmp_path)
    assert main(["merge", "--base", str(base), "--adapter", str(bad), "--out", str(tmp_path / "m"), "--safe"]) == 2
    assert "holds NaN or infinite values: refused" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
