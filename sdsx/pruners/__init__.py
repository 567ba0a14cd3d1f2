"""One-shot pruners as pure tensor functions: (weight, statistics, pattern) -> PruneResult."""

from sdsx.pruners import registry
from sdsx.pruners.base import PruneResult, reconstruction_error
from sdsx.pruners.magnitude import magnitude, select_mask
from sdsx.pruners.ria import ria
from sdsx.pruners.sparsegpt import FactorCache, inverse_hessian_factor, sparsegpt
from sdsx.pruners.spec import SparsitySpec
from sdsx.pruners.wanda import wanda

__all__ = [
    "FactorCache",
    "PruneResult",
    "SparsitySpec",
    "inverse_hessian_factor",
    "magnitude",
    "reconstruction_error",
    "registry",
    "ria",
    "select_mask",
    "sparsegpt",
    "wanda",
]
