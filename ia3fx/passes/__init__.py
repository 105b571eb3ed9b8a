"""Graph passes: each takes a GraphModule (and what it needs) and returns it with a small record."""

from .cleanup import CleanupResult, cleanup_graph
from .fold import FoldResult, SharedWeightError, fold_scales
from .insert import InsertResult, insert_scales, slot_attr
from .modules_to_save import RedirectResult, redirect_modules_to_save

__all__ = [
    "CleanupResult",
    "FoldResult",
    "InsertResult",
    "RedirectResult",
    "SharedWeightError",
    "cleanup_graph",
    "fold_scales",
    "insert_scales",
    "redirect_modules_to_save",
    "slot_attr",
]
