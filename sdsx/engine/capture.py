"""Capture of the first block's inputs: calibration ids as batches, the exception that stops the
model once block 0 has its arguments, and the cleaning of captured arguments (detached tensors,
no KV caches)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["Captured", "as_batches", "clean_arguments", "is_cache", "pass_through"]


class Captured(Exception):
    """Raised by the block-0 hook to stop the model once the block's inputs are known."""


def pass_through(*args: Any, **kwargs: Any) -> Any:
    """Stands in for a block's forward while capture() looks for the arguments of later blocks."""
    return args[0] if args else kwargs["hidden_states"]


def is_cache(obj: Any) -> bool:
    # KV caches must not be shared between calibration batches; matched by name so that this
    # module does not need transformers.
    return any(cls.__name__.endswith("Cache") for cls in type(obj).__mro__)


def clean_arguments(obj: Any) -> Any:
    """Detach tensors and drop KV caches from captured block arguments."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if is_cache(obj):
        return None
    if isinstance(obj, tuple):
        return tuple(clean_arguments(o) for o in obj)
    if isinstance(obj, list):
        return [clean_arguments(o) for o in obj]
    if isinstance(obj, dict):
        return {k: clean_arguments(v) for k, v in obj.items()}
    return obj


def as_batches(calib: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 1) -> list[torch.Tensor]:
    """Split calibration token ids into (b, L) LongTensor batches.

    Accepts a (nsamples, seqlen) tensor, a 1-D tensor (one sequence), or a list of 1-D / 2-D
    tensors (sequences of one list entry may differ in length from another's).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(calib, torch.Tensor):
        seqs = [calib.unsqueeze(0)] if calib.dim() == 1 else [calib]
    else:
        seqs = []
        for item in calib:
            if not isinstance(item, torch.Tensor):
                item = torch.as_tensor(item)
            seqs.append(item.unsqueeze(0) if item.dim() == 1 else item)
    batches: list[torch.Tensor] = []
    for seq in seqs:
        if seq.dim() != 2:
            raise ValueError(f"calibration tensors must be (nsamples, seqlen) token ids, got shape {tuple(seq.shape)}")
        for start in range(0, seq.shape[0], batch_size):
            batches.append(seq[start : start + batch_size])
    return batches
