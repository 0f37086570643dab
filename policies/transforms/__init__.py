"""Pure `bytes -> bytes` transforms applied at delivery: ZIP encryption and Bcc rewriting."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def numpy_or_none() -> ModuleType | None:
    """numpy, imported on the first encryption rather than at start-up (~60 ms of it),
    or None where it is not installed: the fast kernels are optional."""
    try:
        import numpy
    except ImportError:  # pragma: no cover - exercised only where numpy is absent
        return None
    return numpy
