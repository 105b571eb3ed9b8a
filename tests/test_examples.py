"""The runnable examples run, and say what they claim (the documentation's code: test_docs_code.py).

Each ``examples/*.py`` runs in its own interpreter and must exit 0 (and print its key line, for
the examples listed in ``KEY_LINES``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# Generous: the examples take well under a minute on two idle cores; CI machines may be busy.
TIMEOUT = 600

# The lines that state each example's claim; an example not listed only has to exit 0.
KEY_LINES = {
    "train_and_save.py": ["went down", "PEFT reload: max |logits diff|", "OK: trained, saved and reloaded"],
    "train_with_trainer.py": ["OK: trained with Trainer, saved, reloaded and resumed"],
    "plan_targets.py": ["OK: all plans as expected"],
    "peft_parity.py": ["OK: ia3fx matches PEFT within 1e-05 on 4 models"],
    "generate_and_export.py": ["OK: generate, pt2 and ONNX decodes agree"],
    "serve_mixed_onnx.py": ["OK: one ONNX model served 3 adapters per request, equal to generate"],
    "viewer_screenshots.py": ["ok  overlay 'mean |v-1|'", "ok  side by side", "ok  ... and ia3fx's metadata",
                              "OK: Model Explorer and Netron show the adapter's nodes, attributes and vector statistics"],
    "custom_module.py": ["max |graph - eager reference| = 0.00e+00", "OK: every call site scaled as configured"],
}

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
