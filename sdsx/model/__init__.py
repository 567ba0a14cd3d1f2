"""Model plumbing: the only code that knows Hugging Face modules (blocks, linears, the driver).

The driver's names (``BlockDriver`` ...) resolve on first use: the driver sits above the engine,
which itself uses :mod:`sdsx.model.blocks`, so this package does not import it up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sdsx.model.blocks import find_blocks, find_linears, get_weight, set_weight
from sdsx.model.smollm2 import load_smollm2

if TYPE_CHECKING:
    from sdsx.model.driver import BlockDriver, DriverResult, LayerFn, LayerRecord, as_batches

_DRIVER = ("BlockDriver", "DriverResult", "LayerFn", "LayerRecord", "as_batches")

__all__ = [
    "BlockDriver",
    "DriverResult",
    "LayerFn",
    "LayerRecord",
    "as_batches",
    "find_blocks",
    "find_linears",
    "get_weight",
    "load_smollm2",
    "set_weight",
]


def __getattr__(name: str) -> Any:
    if name in _DRIVER:
        value = getattr(importlib.import_module("sdsx.model.driver"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sdsx.model' has no attribute {name!r}")
