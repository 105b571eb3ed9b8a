"""Every ``ia3fx`` error is one line on stderr and a non-zero exit, never a traceback, and writes nothing.

The table runs the real command (``python -m ia3fx``) in a subprocess per row, each in its own
directory holding the same small input files; the rows run a few at a time (each pays ~3 s of
imports). A row checks the exit code, a phrase of the message, that stderr is exactly one line
without "Traceback", and that its directory is exactly as before: no file created, none changed.
A full disk is a file size limit (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored): writes fail with EFBIG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from ia3fx import cli

REPO = Path(__file__).resolve().parents[1]
JOBS = max(2, min(4, os.cpu_count() or 2))
ROW_TIMEOUT_S = 300

ADAPTER_CONFIG = {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
INPUTS = {  # the files in every row's directory
    "list.json": '["q_proj", "v_proj"]',
    "bad-regex.json": '{"peft_type": "IA3", "exclude_modules": "[a"}',
    "five.json": '{"peft_type": "IA3", "target_modules": 5}',
    "broken.json": '{"target_modules": ["q_proj",',
    "blocker": "a file where a directory would go\n",
    "notzip.pt2": "not a zip archive\n",
    "adapter/adapter_config.json": json.dumps(ADAPTER_CONFIG),
    "adapter/adapter_model.safetensors": "old weights\n",
    "empty/": None,
}


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    code: int
    phrase: str
    fsize: int | None = None  # RLIMIT_FSIZE in bytes: a full disk
    interrupt: str | None = None  # send SIGINT once stdout shows this


def row(id, argv, code, phrase, **kw):
    return Row(id, tuple(argv.split()) if isinstance(argv, str) else tuple(argv), code, phrase, **kw)


ROWS = [
    # bad patterns and configs: refused before the model is built
    row("regex-target", ["plan", "tiny-llama", "--target-modules", "q_proj("], 2,
        "target_modules='q_proj(' is not a valid regular expression"),
    row("regex-exclude-in-config", "report tiny-llama --config bad-regex.json", 2,
        "exclude_modules='[a' is not a valid regular expression"),
    row("config-json-list", "apply tiny-llama --config list.json --out new-adapter", 2,
        "--config 'list.json' holds a JSON list, not an object"),
    row("config-targets-int", "export tiny-llama --config five.json --out m.pt2", 2,
        "target_modules must be a list of module names or one regex string, got int 5"),
    row("config-invalid-json", "viz tiny-llama --config broken.json --out g.dot", 2, "'broken.json' is not valid JSON"),
    row("config-missing", "plan tiny-llama --config missing.json", 2, "--config: 'missing.json' not found"),
    row("config-dir-without-file", "plan tiny-llama --config empty", 2, "directory 'empty' has no adapter_config.json"),
    row("feedforward-not-target", "plan tiny-llama --target-modules q_proj --feedforward-modules down_proj", 2,
        "--feedforward-modules down_proj not in --target-modules (q_proj): `feedforward_modules` should be a subset"),
    row("targets-drop-config-feedforward", "apply tiny-llama --config adapter --target-modules k_proj --out new-adapter",
        2, "leaves out the feedforward modules of --config 'adapter' (down_proj)"),
    # demo's numbers and argparse's errors
    row("demo-steps-0", "demo --steps 0 --out demo-out", 2, "--steps must be at least 1, got 0"),
    row("demo-lr-negative", "demo --steps 2 --lr -1 --out demo-out", 2, "--lr must be a positive number, got -1.0"),
    row("argparse-bad-int", "demo --steps many --out demo-out", 2, "argument --steps: invalid int value: 'many'; see ia3fx demo --help"),
    # models, inputs and output paths
    row("model-missing", "plan no-such-model", 2, "model 'no-such-model' is neither a preset"),
    row("model-dir-without-config", "report empty --meta", 2, "has no config.json"),
    row("model-name-cut", ["plan", "x" * 300], 2, "model '" + "x" * 77 + "...' is neither a preset"),
    row("out-under-a-file", "export tiny-llama --out blocker/model.pt2", 2, "'blocker' is a file, not a directory"),
    row("out-dir-is-a-file", "apply tiny-llama --out blocker", 2, "--out 'blocker' is a file; a directory is needed"),
    row("pt2-not-a-zip", "swap-adapter notzip.pt2 adapter --out swapped.pt2", 2, "'notzip.pt2' is not a .pt2 archive"),
    # a full disk: the previous adapter stays, no partial file is left
    row("full-disk-safetensors", "apply tiny-gpt2 --out adapter --force", 2,
        "File too large writing 'adapter': the disk is full", fsize=1000),
    row("full-disk-graph", "viz tiny-gpt2 --out graph.dot", 2,
        "File too large writing 'graph.dot': the disk is full", fsize=1000),
    row("full-disk-pt2", "export tiny-gpt2 --out model.pt2", 2,  # torch's writer alone would abort the process
        "writing 'model.pt2': the disk is full", fsize=1000),
    # Ctrl-C while training
    row("interrupt", "demo --steps 2000 --out empty", 130, "ia3fx demo: interrupted", interrupt="1. base model"),
]


# --- running the table ---------------------------------------------------------------------------
def _populate(directory: Path) -> None:
    for name, text in INPUTS.items():
        path = directory / name
        if text is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def _snapshot(directory: Path) -> dict[str, str]:
    """Every file (its content hash) and every directory below ``directory``."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), directory) + "/"] = "dir"
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, directory)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def _preexec(fsize: int | None):
    def pre() -> None:
        # Python raises KeyboardInterrupt on SIGINT only if SIGINT was not ignored when it started
        # (it is, under a shell's background job): the child gets the default, as in a terminal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return pre


def _start(r: Row, directory: Path, logs: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(logs / f"{r.id}.out", "w") as out, open(logs / f"{r.id}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "ia3fx", *r.argv], cwd=directory, env=env,
                                stdout=out, stderr=err, preexec_fn=_preexec(r.fsize))


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Run the selected rows, ``JOBS`` at a time (from this thread: ``preexec_fn`` and threads do not
    mix); each row's exit code, stdout, stderr, and its directory's snapshots before and after."""
    wanted = {item.callspec.params["r"].id for item in request.session.items
              if getattr(item, "originalname", None) == "test_error_row"}
    base, logs = tmp_path_factory.mktemp("rows"), tmp_path_factory.mktemp("logs")
    pending = [r for r in ROWS if r.id in wanted]
    running: dict[str, tuple[Row, subprocess.Popen, float]] = {}
    signalled: set[str] = set()
    results, before = {}, {}
    while pending or running:
        while pending and len(running) < JOBS:
            r = pending.pop(0)
            directory = base / r.id
            directory.mkdir()
            _populate(directory)
            before[r.id] = _snapshot(directory)
            running[r.id] = (r, _start(r, directory, logs), time.monotonic())
        for rid, (r, proc, t0) in list(running.items()):
            out = (logs / f"{rid}.out").read_text()
            if r.interrupt and rid not in signalled and r.interrupt in out and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                signalled.add(rid)
            if proc.poll() is None and time.monotonic() - t0 > ROW_TIMEOUT_S:
                proc.kill()
            if proc.poll() is not None:
                del running[rid]
                err = (logs / f"{rid}.err").read_text()
                results[rid] = (proc.returncode, (logs / f"{rid}.out").read_text(), err, before[rid],
                                _snapshot(base / rid))
        time.sleep(0.05)
    return results


@pytest.mark.parametrize("r", ROWS, ids=[r.id for r in ROWS])
def test_error_row(r, outcomes):
    code, out, err, before, after = outcomes[r.id]
    lines = err.splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line:\n{err}"
    assert code == r.code, err
    assert lines[0].startswith(f"ia3fx {r.argv[0]}: "), lines[0]
    assert r.phrase in lines[0], lines[0]
    assert len(lines[0]) <= cli.LINE_CHARS + 80, lines[0]
    assert after == before, "files were created or changed"
    if r.code == 2:
        assert out == ""  # nothing reported as done


# --- the same rules in-process (no subprocess) ---------------------------------------------------
def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unexpected_error_is_one_line_with_the_debug_hint(monkeypatch, capsys):
    def broken(spec):
        raise AttributeError("'NoneType' object has no attribute 'config'")

    monkeypatch.setattr(cli, "load_model", broken)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["plan", "tiny-llama"]) == 1
    line = _one_line(capsys)
    assert line.startswith("ia3fx plan: error: unexpected AttributeError: 'NoneType' object has no attribute")
    assert f"rerun with {cli.DEBUG_ENV}=1 for the traceback" in line
    monkeypatch.setenv(cli.DEBUG_ENV, "1")  # the traceback: the exception propagates
    with pytest.raises(AttributeError):
        cli.main(["plan", "tiny-llama"])


def test_debug_shows_the_traceback_of_an_input_error(monkeypatch, capsys):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.main(["plan", "tiny-llama", "--target-modules", "q_proj("]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("ia3fx plan: error: target_modules=")


def test_interrupt_in_process(monkeypatch, capsys):
    def interrupted(spec):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_model", interrupted)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["plan", "tiny-llama"]) == 130
    assert _one_line(capsys) == "ia3fx plan: interrupted"


def test_os_errors_name_the_file_and_what_to_do():
    args = cli.build_parser().parse_args(["apply", "tiny-llama", "--out", "x"])
    reason = cli._reason(FileNotFoundError(2, "No such file or directory", "in.json"), args)
    assert reason == "'in.json': No such file or directory: check the path"
    reason = cli._reason(OSError(28, "No space left on device", "x/.tmp-file"), args)
    assert reason.startswith("No space left on device writing 'x': the disk is full")
    assert cli._reason(FileExistsError("x already exists; pass --force"), args) == "x already exists; pass --force"
    assert cli._reason(KeyError("no vector named 'a'"), args) == "no vector named 'a'"


def test_warnings_are_one_line(monkeypatch, capsys):
    def warn_then_fail(spec):
        warnings.warn("a warning\nover two lines", UserWarning, stacklevel=1)
        raise ValueError("then an error")

    monkeypatch.setattr(cli, "load_model", warn_then_fail)
    assert cli.main(["plan", "tiny-llama"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "ia3fx plan: warning: a warning over two lines", "ia3fx plan: error: then an error",
    ]
