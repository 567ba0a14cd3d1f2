"""Model plumbing: the only code that knows Hugging Face modules (blocks, linears, the driver)."""

from sdsx.model.blocks import find_blocks, find_linears, get_weight, set_weight
from sdsx.model.driver import BlockDriver, DriverResult, LayerFn, LayerRecord, as_batches
from sdsx.model.smollm2 import load_smollm2

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
