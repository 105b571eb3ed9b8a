"""The runnable examples and the documentation's code run, and say what they claim.

Each ``examples/*.py`` runs in its own interpreter and must exit 0 (and print its key line, for
the examples listed in ``KEY_LINES``). The ``python`` blocks of each ``docs/*.md`` page run in
order in one interpreter (a page reads like a session) in a temporary directory; then, in that
directory, every ``$ ia3fx ...`` line of the page's ``console`` blocks runs as
``python -m ia3fx ...``. It must exit 0, unless the line shown after it is an error line
(``ia3fx <command>: error: ...``): then it must exit 2 with an error line of that command. Commands that cannot
run on a fresh machine (a model that is not there) belong in ``text`` blocks.
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

# The lines that state each example's claim; an example not listed only has to exit 0.
KEY_LINES = {
    "train_and_save.py": ["went down", "PEFT reload: max |logits diff|", "OK: trained, saved and reloaded"],
    "train_with_trainer.py": ["OK: trained with Trainer, saved, reloaded and resumed"],
    "plan_targets.py": ["OK: all plans as expected"],
    "peft_parity.py": ["OK: ia3fx matches PEFT within 1e-05 on 4 models"],
    "generate_and_export.py": ["OK: generate, pt2 and ONNX decodes agree"],
    "custom_module.py": ["max |graph - eager reference| = 0.00e+00", "OK: every call site scaled as configured"],
}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads that
    # spin-wait for a core make every step many times slower
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _report(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def test_examples_are_collected():
    assert {p.name for p in EXAMPLES} >= set(KEY_LINES)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path):
    proc = _run([sys.executable, str(script)], cwd=tmp_path)
    assert proc.returncode == 0, _report(proc)
    for line in KEY_LINES.get(script.name, []):
        assert line in proc.stdout, f"missing {line!r}\n{_report(proc)}"


def _blocks(page: Path) -> list[tuple[str, str]]:
    return FENCE.findall(page.read_text(encoding="utf-8"))


def _commands(blocks: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """``(arguments, expected error line or None)`` for each ``$ ia3fx`` line of the console blocks."""
    out: list[tuple[str, str | None]] = []
    for lang, body in blocks:
        if lang != "console":
            continue
        lines = body.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("$ ia3fx "):
                continue
            shown = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("$ ") else ""
            error = shown if re.match(r"ia3fx [\w-]+: error: ", shown) else None
            out.append((line[len("$ ia3fx ") :], error))
    return out


def _has_code(page: Path) -> bool:
    blocks = _blocks(page)
    return any(lang == "python" for lang, _ in blocks) or bool(_commands(blocks))


DOCS_WITH_CODE = [p for p in DOCS if _has_code(p)]


def test_only_the_index_page_has_no_code():
    assert {p.name for p in DOCS} - {p.name for p in DOCS_WITH_CODE} == {"index.md"}


@pytest.mark.parametrize("page", DOCS_WITH_CODE, ids=[p.name for p in DOCS_WITH_CODE])
def test_doc_code_runs(page: Path, tmp_path: Path):
    blocks = _blocks(page)
    code = "\n\n".join(body for lang, body in blocks if lang == "python")
    commands = _commands(blocks)
    if code:
        proc = _run([sys.executable, "-c", code], cwd=tmp_path)
        assert proc.returncode == 0, f"{page.name}: python blocks failed\n{_report(proc)}"
    for command, error in commands:
        proc = _run([sys.executable, "-m", "ia3fx", *shlex.split(command)], cwd=tmp_path)
        where = f"{page.name}: `ia3fx {command}`"
        if error is None:
            assert proc.returncode == 0, f"{where} failed\n{_report(proc)}"
        else:
            assert proc.returncode == 2, f"{where} should fail with {error!r}\n{_report(proc)}"
            assert error.split(": error: ")[0] + ": error: " in proc.stderr, f"{where}\n{_report(proc)}"
