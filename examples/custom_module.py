"""(IA)³ on a plain ``nn.Module``: a Conv2d, Linear layers (one called twice) and an ``F.linear``
on a bare parameter, each call site scaled as the config says.

    python examples/custom_module.py

A plain module has no ``model_type``, so PEFT's rule applies: name ``target_modules`` and give
``feedforward_modules`` explicitly (``[]`` if none). ``gate`` is not a module but a parameter used
through ``F.linear``: ia3fx finds that call in the graph and names the layer by the parameter's
path. ``mix`` is called twice: two call sites, one shared vector (PEFT's module-level meaning).

The script prints the call sites, checks the adapted model against a hand-written eager
reference with random vectors, checks that only the vectors get gradients, and that
``torch.fx.symbolic_trace`` (no example inputs) and ``torch.export`` (with example inputs) find the
same call sites. Exits non-zero if any check fails.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import ia3fx


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 16)
        self.mix = nn.Linear(16, 16)
        self.gate = nn.Parameter(torch.randn(16, 16) / 4)  # a bare weight, used with F.linear
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        h = torch.relu(self.proj(h))
        h = torch.relu(self.mix(h))
        h = self.mix(h)  # the same module again
        h = F.linear(torch.tanh(h), self.gate)
        return self.head(h)


def reference(net: Net, v: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """What the config means, written out: output scales after, input scales before the call."""
    h = net.conv(x) * v["conv"].reshape(1, -1, 1, 1)  # conv2d, output: per output channel
    h = torch.relu(h).mean(dim=(2, 3))
    h = torch.relu(net.proj(h * v["proj"]))  # feedforward: the input is scaled
    h = torch.relu(net.mix(h) * v["mix"])
    h = net.mix(h) * v["mix"]  # second call, same vector
    h = F.linear(torch.tanh(h), net.gate) * v["gate"]
    return net.head(h)


CONFIG = ia3fx.IA3Config(target_modules=["conv", "proj", "mix", "gate"], feedforward_modules=["proj"])


def main() -> int:
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    failures: list[str] = []

    ia3 = ia3fx.get_ia3_model(net, CONFIG)  # no example inputs: torch.fx.symbolic_trace
    print(f"{'node':<9} {'layer':<5} {'kind':<18} {'call':>4}  scale")
    for s in ia3.call_sites:
        print(f"{s.node:<9} {s.name:<5} {s.kind:<18} {s.call_index:>4}  {s.scale or '-'}")
    kinds = {s.name: s.kind for s in ia3.call_sites}
    if kinds != {"conv": "conv2d", "proj": "linear", "mix": "linear", "gate": "functional_linear", "head": "linear"}:
        failures.append(f"unexpected call sites {kinds}")
    if [s.call_index for s in ia3.call_sites if s.name == "mix"] != [0, 1]:
        failures.append("mix should have two call sites")

    print("\nvectors (PEFT layout):", {k: tuple(t.shape) for k, t in ia3.adapter_state_dict().items()})
    print("graph reads them via get_attr:", sorted({n.target for n in ia3.graph_module.graph.nodes
                                                    if n.op == "get_attr" and n.target.startswith("ia3_l.")}))

    # at initialisation the vectors are ones: the adapted model is the base model
    with torch.no_grad():
        if not torch.equal(ia3(x), net(x)):
            failures.append("ones vectors should leave the output unchanged")

    # random vectors: the graph computes exactly what reference() spells out
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ia3.targets:
            v = ia3.get_vector(name)  # in-graph shape: (n,) for linear, (C, 1, 1) for conv2d
            v.copy_(1 + 0.5 * torch.randn(v.shape, generator=g))
        vectors = {name: ia3.get_vector(name) for name in ia3.targets}
        diff = (ia3(x) - reference(net, vectors, x)).abs().max().item()
    print(f"\nmax |graph - eager reference| = {diff:.2e}")
    if diff > 1e-6:
        failures.append(f"graph and reference differ by {diff}")

    # only the vectors train
    ia3(x).square().mean().backward()
    with_grad = sorted(n for n, p in ia3.named_parameters() if p.grad is not None)
    print("parameters with a gradient:", with_grad)
    if with_grad != sorted(f"ia3_l.default.{k}" for k in ("conv", "proj", "mix", "gate")):
        failures.append(f"unexpected gradients: {with_grad}")

    # torch.export (with example inputs) finds the same call sites
    exported = ia3fx.plan(net, CONFIG, example_inputs=(x,))
    same = [(s.name, s.kind, s.scale) for s in exported.call_sites] == [
        (s.name, s.kind, s.scale) for s in ia3.call_sites
    ]
    print(f"torch.export finds the same call sites: {same}")
    if not same:
        failures.append("symbolic_trace and torch.export disagree")

    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("OK: every call site scaled as configured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
