"""Graph passes: each takes a GraphModule (and what it needs) and returns it with a small record."""

from .insert import InsertResult, insert_scales
from .modules_to_save import RedirectResult, redirect_modules_to_save

__all__ = ["InsertResult", "insert_scales", "RedirectResult", "redirect_modules_to_save"]
