"""Worker for ``test_distributed.py``, launched by ``torchrun --nproc_per_node=2``.

It trains the (IA)³ vectors of a tiny Llama for a few AdamW steps under each requested mode
(``ddp``, ``fsdp2``, ``accelerate``), every rank on its own slice of a batch that the reference run
(:func:`train_reference`, one process, the whole batch) sees at once. Rank 0 writes, per mode, the
trained vectors (full tensors, by parameter name), the losses, the block runners' graph/eager call
counts and any error, to ``<out>/<mode>.pt``. A mode that raises on a rank is recorded there and the
worker goes on with the next mode; one that kills the process (a segfault) leaves no file, and the
test relaunches the worker for the modes after it.

Not collected by pytest (no ``test_`` prefix); the pytest process imports it for the shared model,
data and training loop, so the reference and the distributed runs use the same code.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from typing import Any

import torch

VOCAB = 128
WORLD = 2  # ranks
PER_RANK = 2  # sequences per rank and step
SEQ = 9
STEPS = 4
LR = 5e-2  # large enough that the vectors move well away from ones
MODES = ("ddp", "accelerate", "fsdp2")

torch.set_num_threads(1)  # tiny model on a 2-core machine: intra-op threads only add spin-waits


def build_ia3(device: torch.device | str = "cpu") -> Any:
    """The adapted tiny Llama (every call builds the same weights), in train mode, on ``device``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # torchrun runs this file as a script
    from conftest import tiny_llama

    import ia3fx

    model = tiny_llama().to(device)  # the suite's tiny Llama (vocab VOCAB, seed 0)
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config())  # k_proj, v_proj (output), down_proj (input)
    ia3.train()
    return ia3


def rank_batch(step: int, rank: int) -> torch.Tensor:
    """The token ids rank ``rank`` trains on at ``step`` (the same on every launch)."""
    g = torch.Generator().manual_seed(1000 * step + rank + 1)
    return torch.randint(1, VOCAB, (PER_RANK, SEQ), generator=g)


def full_batch(step: int) -> torch.Tensor:
    """Every rank's slice at ``step``, in rank order: what the single-process reference sees."""
    return torch.cat([rank_batch(step, r) for r in range(WORLD)])


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=LR, weight_decay=0.01)


def train(model: Any, optimizer: torch.optim.Optimizer, batch_of: Any, device: Any, backward: Any = None) -> list[float]:
    """``STEPS`` steps of causal-LM loss (mean over tokens: every slice has as many) on ``batch_of(step)``."""
    losses = []
    for step in range(STEPS):
        ids = batch_of(step).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        if backward is None:
            loss.backward()
        else:
            backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if hasattr(t, "full_tensor"):  # FSDP2: a DTensor sharded over the ranks (a collective: every rank calls)
        t = t.full_tensor()
    return t.cpu().clone()


def vectors(ia3: Any) -> dict[str, torch.Tensor]:
    """The trained vectors by parameter name (``ia3_l.default.<layer>``), as full CPU tensors."""
    return {name: _full(p) for name, p in ia3.named_parameters() if name.startswith("ia3_l.")}


def peft_state(ia3: Any) -> dict[str, Any]:
    """``adapter_state_dict()`` (PEFT layout) as full CPU tensors, and the type of tensor it gave."""
    sd = ia3.adapter_state_dict()
    return {"tensors": {k: _full(v) for k, v in sd.items()}, "types": sorted({type(v).__name__ for v in sd.values()})}


def counts(ia3: Any) -> dict[str, dict[str, int]]:
    return {name: {"graph": r.graph_calls, "eager": r.eager_calls} for name, r in ia3._runners.items()}


def train_reference(device: Any = "cpu") -> dict[str, Any]:
    """One process, the whole batch (both ranks' slices) each step: the vectors the ranks must reach."""
    ia3 = build_ia3(device)
    losses = train(ia3, make_optimizer(ia3.parameters()), full_batch, device)
    return {"vectors": vectors(ia3), "losses": losses, "counts": counts(ia3), "peft": peft_state(ia3)}


# --- the distributed modes -----------------------------------------------------------------------
def run_ddp(rank: int, device: torch.device) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ia3 = build_ia3(device)
    ddp = DDP(ia3, device_ids=[device.index] if device.type == "cuda" else None)
    losses = train(ddp, make_optimizer(ddp.parameters()), lambda s: rank_batch(s, rank), device)
    return {"vectors": vectors(ia3), "losses": losses, "counts": counts(ia3), "peft": peft_state(ia3)}


def run_fsdp2(rank: int, device: torch.device) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ia3 = build_ia3(device)
    mesh = init_device_mesh(device.type, (WORLD,))
    for layer in ia3.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(ia3, mesh=mesh)
    sharded = [n for n, p in ia3.named_parameters() if n.startswith("ia3_l.") and hasattr(p, "full_tensor")]
    losses = train(ia3, make_optimizer(ia3.parameters()), lambda s: rank_batch(s, rank), device)
    return {
        "vectors": vectors(ia3), "losses": losses, "counts": counts(ia3), "peft": peft_state(ia3),
        "sharded_vectors": sharded,
    }


def run_accelerate(rank: int, device: torch.device) -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu")
    ia3 = build_ia3(accelerator.device)
    optimizer = make_optimizer(ia3.parameters())
    prepared, optimizer = accelerator.prepare(ia3, optimizer)
    losses = train(prepared, optimizer, lambda s: rank_batch(s, rank), accelerator.device, accelerator.backward)
    unwrapped = accelerator.unwrap_model(prepared)
    return {
        "vectors": vectors(unwrapped),
        "losses": losses,
        "counts": counts(ia3),
        "peft": peft_state(unwrapped),
        "unwrapped_is_model": unwrapped is ia3,
        "wrapper": type(prepared).__name__,
        "distributed_type": str(accelerator.distributed_type),
    }


RUNNERS = {"ddp": run_ddp, "fsdp2": run_fsdp2, "accelerate": run_accelerate}


def main() -> int:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert world == WORLD, f"launch with --nproc_per_node={WORLD}, not {world}"
    if args.backend == "nccl":
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=120))
    os.makedirs(args.out, exist_ok=True)

    if rank == 0 and device.type == "cuda":  # a reference on this device, for the NCCL runs
        torch.save(train_reference(device), os.path.join(args.out, "reference.pt"))

    for mode in args.modes.split(","):
        try:
            result = RUNNERS[mode](rank, device)
            error = None
        except Exception:  # noqa: BLE001 - reported by the test, the next mode still runs
            result, error = {}, traceback.format_exc()
        # every rank reports: a failure on either is the mode's failure; the ranks' vectors must agree
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {k: result.get(k) for k in ("vectors", "counts", "losses")} | {"error": error})
        if rank == 0:
            result["errors"] = {r: g["error"] for r, g in enumerate(gathered) if g["error"]}
            result["rank_vectors"] = [g["vectors"] for g in gathered]
            result["rank_counts"] = [g["counts"] for g in gathered]
            result["rank_losses"] = [g["losses"] for g in gathered]
            torch.save(result, os.path.join(args.out, f"{mode}.pt"))
        print(f"[rank {rank}] {mode}: {'FAILED' if error else 'ok'}", flush=True)
        if error:
            print(error, file=sys.stderr, flush=True)
        dist.barrier()

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
