"""Distributed training of an ``IA3Model``: DDP, FSDP2 (``fully_shard`` per decoder layer, then the
root) and accelerate, launched with ``torchrun --nproc_per_node=2`` (gloo on CPU; NCCL where two GPUs
are present), train the very vectors that one process trains on the whole batch.

The worker is ``tests/_dist_worker.py``; one launch per backend runs every mode in turn, and a launch
that dies in a mode (a segfault, a timeout) is started again for the modes after it, so that each test
reports its own mode's failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _dist_worker as W
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("_dist_worker.py")
LAUNCH_TIMEOUT = 300  # seconds, per torchrun launch (a healthy one takes ~25 s on 2 CPU cores)
ATOL = 1e-5
MOVED = 1e-2  # the reference vectors move at least this far from ones: the comparisons mean something

MODES_BY_BACKEND = {"gloo": ("ddp", "accelerate", "fsdp2"), "nccl": ("ddp", "fsdp2")}


@dataclass
class Crash:
    """A mode whose launch died before rank 0 wrote its result."""

    returncode: int | None
    output: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _run_torchrun(backend: str, modes: list[str], out: Path) -> tuple[int | None, str]:
    cmd = [
        *_torchrun(),
        f"--nproc_per_node={W.WORLD}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(WORKER),
        "--backend", backend,
        "--modes", ",".join(modes),
        "--out", str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # own session: on a timeout the whole group (torchrun and its ranks) is killed
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[killed: the launch ran past {LAUNCH_TIMEOUT} s]"
    return proc.returncode, output


def _launch(backend: str, out: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Every mode's result (or :class:`Crash`), and the worker's own reference (NCCL runs) if any."""
    results: dict[str, Any] = {}
    reference = None
    pending = list(MODES_BY_BACKEND[backend])
    while pending:
        shutil.rmtree(out, ignore_errors=True)
        returncode, output = _run_torchrun(backend, pending, out)
        if (out / "reference.pt").exists():
            reference = torch.load(out / "reference.pt", weights_only=False)
        done = [m for m in pending if (out / f"{m}.pt").exists()]
        for mode in done:
            results[mode] = torch.load(out / f"{mode}.pt", weights_only=False)
        rest = [m for m in pending if m not in done]
        if rest:  # the launch died in the first mode without a result; the others get a new launch
            results[rest[0]] = Crash(returncode, output)
        pending = rest[1:]
    return results, reference


def _crash_report(output: str) -> str:
    """The first rank's fatal-error stack (faulthandler's, for a segfault) and torchrun's summary,
    else the output's last lines; export's shape warnings left out."""
    lines = [ln for ln in output.splitlines() if "non_strict_utils.py" not in ln]
    fatal = next((i for i, ln in enumerate(lines) if ln.startswith("Fatal Python error")), None)
    summary = next((i for i, ln in enumerate(lines) if "Root Cause" in ln), None)
    if fatal is None:
        return "\n".join(lines[-60:])
    stack = []
    for ln in lines[fatal:]:
        if ln.startswith("Extension modules") or (len(stack) > 3 and not ln.strip()):
            break
        stack.append(ln)
    tail = lines[summary - 1:] if summary is not None else []
    return "\n".join([*stack, "...", *tail])


def _require_backend(backend: str) -> None:
    if backend == "nccl":
        if not torch.cuda.is_available():
            pytest.skip("NCCL runs need CUDA, and torch.cuda.is_available() is False on this machine")
        if torch.cuda.device_count() < W.WORLD:
            pytest.skip(f"NCCL runs need {W.WORLD} GPUs (one per rank); this machine has {torch.cuda.device_count()}")


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """One process, both ranks' slices in one batch, the same steps."""
    return W.train_reference()


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {}

    def get(backend: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if backend not in cache:
            cache[backend] = _launch(backend, tmp_path_factory.mktemp(f"dist_{backend}"))
        return cache[backend]

    return get


def _result(launches: Any, reference: dict[str, Any], backend: str, mode: str) -> tuple[dict, dict]:
    """The mode's rank-0 result and the reference to compare it with; fails on a crash or an error."""
    _require_backend(backend)
    results, device_reference = launches(backend)
    result = results[mode]
    if isinstance(result, Crash):
        pytest.fail(
            f"the {mode} run ({backend}) died before rank 0 wrote its result (torchrun exit code "
            f"{result.returncode}):\n{_crash_report(result.output)}",
            pytrace=False,
        )
    if result["errors"]:
        pytest.fail(
            "\n".join(f"--- rank {r} raised in the {mode} run ({backend}):\n{tb}" for r, tb in result["errors"].items()),
            pytrace=False,
        )
    if backend == "nccl":  # compared with one process on the same kind of device
        assert device_reference is not None, "the NCCL launch wrote no reference"
        reference = device_reference
    return result, reference


def _check_training(result: dict[str, Any], reference: dict[str, Any], mode: str) -> None:
    ref = reference["vectors"]
    assert set(result["vectors"]) == set(ref), "the ranks trained other vectors than the reference"
    # every rank holds the same (full) vectors after training
    for rank, vecs in enumerate(result["rank_vectors"]):
        for name, v in vecs.items():
            torch.testing.assert_close(v, result["rank_vectors"][0][name], atol=1e-6, rtol=0,
                                       msg=lambda m, n=name, r=rank: f"rank {r} disagrees with rank 0 on {n}: {m}")
    for name, v in result["vectors"].items():
        torch.testing.assert_close(v, ref[name], atol=ATOL, rtol=0,
                                   msg=lambda m, n=name: f"{mode}: {n} is not the single-process vector: {m}")
    # the same in PEFT's layout (adapter_state_dict, gathered where it is sharded)
    peft_ref = reference["peft"]["tensors"]
    assert set(result["peft"]["tensors"]) == set(peft_ref)
    for key, v in result["peft"]["tensors"].items():
        torch.testing.assert_close(v, peft_ref[key], atol=ATOL, rtol=0)
    # each step's loss, averaged over the ranks' equal slices, is the whole batch's loss
    mean_losses = [sum(step) / len(step) for step in zip(*result["rank_losses"])]
    assert mean_losses == pytest.approx(reference["losses"], abs=ATOL)


def _check_graphs_ran(result: dict[str, Any]) -> None:
    """Every decoder layer ran its rewritten graph at every step, on every rank, never the fallback."""
    for rank, counts in enumerate(result["rank_counts"]):
        assert set(counts) == {"model.layers.0", "model.layers.1"}
        for name, c in counts.items():
            assert c["graph"] > 0, f"rank {rank}: {name} never ran its graph (only the eager fallback): {c}"
            assert c["eager"] == 0, f"rank {rank}: {name} fell back to its own forward: {c}"


def test_reference_trains(reference):
    moved = {n: float((v - 1).abs().max()) for n, v in reference["vectors"].items()}
    assert len(moved) == 6 and min(moved.values()) > MOVED, moved
    for name, c in reference["counts"].items():
        assert c == {"graph": W.STEPS, "eager": 0}, name


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_ddp_matches_single_process(launches, reference, backend):
    result, ref = _result(launches, reference, backend, "ddp")
    _check_training(result, ref, "ddp")
    _check_graphs_ran(result)


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_fsdp2_matches_single_process(launches, reference, backend):
    result, ref = _result(launches, reference, backend, "fsdp2")
    # the vectors live in the root FSDP group: sharded DTensors between steps
    assert sorted(result["sharded_vectors"]) == sorted(ref["vectors"])
    _check_graphs_ran(result)
    _check_training(result, ref, "fsdp2")


def test_accelerate_matches_single_process(launches, reference):
    result, ref = _result(launches, reference, "gloo", "accelerate")
    assert result["distributed_type"] == "DistributedType.MULTI_CPU"
    assert result["wrapper"] == "DistributedDataParallel"
    assert result["unwrapped_is_model"]
    _check_training(result, ref, "accelerate")
    _check_graphs_ran(result)
