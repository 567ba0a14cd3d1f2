"""Fingerprints (SHA-256) of a model's weights and config and of calibration token ids: what a
checkpoint (:mod:`sdsx.checkpoint`) and a cache of generated windows (:mod:`sdsx.data.sources`) must
match to be reused."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import torch

__all__ = ["CHUNK_BYTES", "fingerprint_calibration", "fingerprint_model"]

CHUNK_BYTES = 16 << 20  # bytes hashed per update (also by sdsx.checkpoint)


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel() == 0:
        return
    flat = t.contiguous().reshape(-1).cpu()
    step = max(1, CHUNK_BYTES // flat.element_size())
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        h.update((chunk.view(torch.uint8) if chunk.dtype != torch.bool else chunk.to(torch.uint8)).numpy().tobytes())


def fingerprint_model(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, shapes, dtypes, bytes) and the config."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        try:
            h.update(config.to_json_string(use_diff=False).encode())
        except TypeError:
            h.update(config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, tensor)
    return h.hexdigest()


def fingerprint_calibration(batches: Iterable[torch.Tensor] | None) -> str:
    """SHA-256 of the calibration token ids, batch by batch (shapes included)."""
    h = hashlib.sha256()
    for b in batches or []:
        _hash_tensor(h, b.long())
    return h.hexdigest()
