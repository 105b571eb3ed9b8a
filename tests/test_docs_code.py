"""The documentation's code runs (the examples: test_examples.py).

The ``python`` blocks of each ``docs/*.md`` page run in order in one interpreter (a page reads like
a session) in a temporary directory; then, in that directory, every ``$ ia3fx ...`` line of the
page's ``console`` blocks runs as ``python -m ia3fx ...``. It must exit 0, unless the line shown
after it is an error line (``ia3fx <command>: error: ...``): then it must exit 2 with an error line
of that command. Commands that cannot run on a fresh machine (a model that is not there) belong in
``text`` blocks.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from test_examples import ROOT, _report, _run

DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


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
