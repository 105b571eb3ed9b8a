"""The coverage table (issue 14): every architecture of ``arch_cases.ARCHS`` adapted with its
defaults and no example inputs, then compared with PEFT column by column. ``docs/architectures.md``
is this table as ``benchmarks/architectures_table.py`` writes it.
"""

from __future__ import annotations

import functools

import pytest
from arch_cases import ARCHS, BY_NAME
from arch_checks import adapt, check_eval, check_grads, check_merge, check_onnx, check_targets

COLUMNS = {
    "targets": check_targets,  # same layers, same way, same trainable count as PEFT
    "eval": check_eval,  # outputs equal PEFT's, through the model and its whole graph
    "grads": check_grads,  # every vector's gradient equals PEFT's
    "merge": check_merge,  # the merged graph computes the unmerged outputs
    "onnx": check_onnx,  # the merged ONNX export runs in onnxruntime and gives the same
}

@functools.cache
def adapted(name: str):
    """One PEFT model and one IA3Model per architecture, shared by its columns."""
    return adapt(BY_NAME[name])


@pytest.mark.parametrize("column", list(COLUMNS))
@pytest.mark.parametrize("name", [a.name for a in ARCHS])
def test_architecture(name, column):
    COLUMNS[column](adapted(name))
