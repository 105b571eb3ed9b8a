"""Project exceptions.

All are ``ValueError`` subclasses where PEFT raises a ``ValueError`` for the same problem, so code
written against PEFT keeps catching them.
"""

from __future__ import annotations


class IA3Error(Exception):
    """Base class of every error ia3fx raises on purpose."""


class NoMatchingModuleError(IA3Error, ValueError):
    """The configuration selects nothing in the model (PEFT: ``NoMatchingPeftModuleError``)."""


class TraceError(IA3Error, RuntimeError):
    """The model could not be captured as a graph; the message names the construct and a way out."""


class AdapterLoadError(IA3Error, ValueError):
    """A state dict or adapter directory does not fit the model; nothing was changed."""


class UnscaledTargetError(IA3Error, ValueError):
    """A targeted layer runs in the graph but not as a linear call site, so no scale could be put
    on it: its vector would scale nothing. The message names the layers and what they compute."""


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters: user strings echoed in messages stay readable."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
