"""The runnable examples and the documentation's code run, and say what they claim.

Each ``examples/*.py`` runs in its own interpreter and must exit 0 and print its key line. The
``python`` blocks of each ``docs/*.md`` page run in order in one interpreter (a page reads like a
session), in a temporary directory, and every ``$ ia3fx ...`` line of its ``console`` blocks runs
as ``python -m ia3fx ...``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
DOCS = sorted((ROOT / "docs").glob("*.md"))

# Generous: the examples take well under a minute on two idle cores; CI machines may be busy.
TIMEOUT = 600

# The line that states each example's claim; an example not listed must print a line "OK: ...".
KEY_LINES = {
    "train_and_save.py": ["went down", "PEFT reload: max |logits diff|", "OK: trained, saved and reloaded"],
    "plan_targets.py": ["OK: all plans as expected"],
    "peft_parity.py": ["OK: ia3fx matches PEFT within 1e-05 on 4 models"],
    "custom_module.py": ["max |graph - eager reference| = 0.00e+00", "OK: every call site scaled as configured"],
}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _report(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def test_examples_are_collected():
    assert {p.name for p in EXAMPLES} >= set(KEY_LINES)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path):
    proc = _run([sys.executable, str(script)], cwd=tmp_path)
    assert proc.returncode == 0, _report(proc)
    for line in KEY_LINES.get(script.name, ["OK: "]):
        assert line in proc.stdout, f"missing {line!r}\n{_report(proc)}"


def _blocks(page: Path) -> list[tuple[str, str]]:
    return FENCE.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_doc_code_runs(page: Path, tmp_path: Path):
    blocks = _blocks(page)
    code = "\n\n".join(body for lang, body in blocks if lang == "python")
    commands = [
        line[len("$ ia3fx ") :]
        for lang, body in blocks
        if lang == "console"
        for line in body.splitlines()
        if line.startswith("$ ia3fx ")
    ]
    if not code and not commands:
        pytest.skip("no code on this page")
    if code:
        proc = _run([sys.executable, "-c", code], cwd=tmp_path)
        assert proc.returncode == 0, f"{page.name}: python blocks failed\n{_report(proc)}"
    for command in commands:
        proc = _run([sys.executable, "-m", "ia3fx", *shlex.split(command)], cwd=tmp_path)
        assert proc.returncode == 0, f"{page.name}: `ia3fx {command}` failed\n{_report(proc)}"
