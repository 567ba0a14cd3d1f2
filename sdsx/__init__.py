"""sdsx: one-shot pruning of causal language models with Sparse-Dense-Sparse (SDS).

    import sdsx
    report = sdsx.sds_prune(model, calib, sparsity="2:4", pruner="sparsegpt")

Importing sdsx is cheap: it loads neither transformers nor CUDA; the public functions below are
resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "backend_info": "sdsx._ext",
    "nm_mask": "sdsx.ops",
    "topk_mask": "sdsx.ops",
    "obs_sweep": "sdsx.ops",
    "prox_step": "sdsx.ops",
    "SparsitySpec": "sdsx.pruners",
    "magnitude": "sdsx.pruners",
    "wanda": "sdsx.pruners",
    "sparsegpt": "sdsx.pruners",
    "ria": "sdsx.pruners",
    "prune": "sdsx.api",
    "PruneReport": "sdsx.api",
    "EngineOptions": "sdsx.api",
    "SDSReport": "sdsx.sds",
    "BlockDriver": "sdsx.model.driver",
    "use_blocks": "sdsx.model.blocks",
    "Checkpoint": "sdsx.checkpoint",
    "CheckpointMismatch": "sdsx.checkpoint",
    "load_text": "sdsx.data",
    "sds_prune": "sdsx.sds",
    "SDSOptions": "sdsx.pruners.sds",
    "calibration": "sdsx.data",
    "perplexity": "sdsx.eval",
    "load_smollm2": "sdsx.model.smollm2",
    "zero_shot": "sdsx.eval.zeroshot",
    "save_pruned": "sdsx.io",
    "load": "sdsx.io",
    "load_masks": "sdsx.io",
    "write_report": "sdsx.report",
    "run": "sdsx.job",
    "RunResult": "sdsx.job",
    "compare": "sdsx.commands",
    "evaluate": "sdsx.commands",
    "RunConfig": "sdsx.config",
    "ModelConfig": "sdsx.config",
    "CalibrationConfig": "sdsx.config",
    "MethodConfig": "sdsx.config",
    "EvalConfig": "sdsx.config",
    "OutputConfig": "sdsx.config",
    "EngineConfig": "sdsx.config",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdsx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
