"""ia3fx: (IA)³ adapters by rewriting torch.fx graphs, with PEFT's semantics and files."""

from .analysis import report as report
from .analysis import to_networkx as to_networkx
from .capture import trace
from .config import IA3Config
from .errors import AdapterLoadError, IA3Error, NoMatchingModuleError, TraceError
from .export import export as export
from .model import IA3Model, Plan, get_ia3_model, plan
from .offline import merge_checkpoint as merge_checkpoint
from .passes import insert_scales, redirect_modules_to_save
from .sites import CallSite, find_call_sites
from .swap import swap_adapter as swap_adapter
from .viz import draw as draw

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "CallSite",
    "IA3Config",
    "IA3Error",
    "IA3Model",
    "NoMatchingModuleError",
    "Plan",
    "TraceError",
    "find_call_sites",
    "get_ia3_model",
    "insert_scales",
    "plan",
    "redirect_modules_to_save",
    "trace",
]
