"""How sequences start: the BOS rule shared by calibration windows, perplexity windows and zero-shot.

``bos="auto"`` (the default everywhere) starts every window with the tokenizer's BOS token when the
tokenizer itself would start a text with it: it has a BOS token, and its ``add_bos_token`` setting is
on or its default encoding of a text begins with that token (LLaMA-2, Gemma and OPT tokenizers do;
GPT-2, SmolLM2 and Qwen ones do not). ``"always"`` prepends BOS whatever the tokenizer does;
``"never"`` cuts windows from one token stream, the published SparseGPT/Wanda protocol.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BOS_MODES", "bos_id", "expects_bos", "protocol", "with_bos"]

BOS_MODES: tuple[str, ...] = ("auto", "always", "never")


def expects_bos(tokenizer: Any) -> bool:
    """True when ``tokenizer`` starts a text with its BOS token by default (the rule of ``bos="auto"``).

    Only Hugging Face tokenizers can say so; a plain callable str -> ids never does.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or not hasattr(tokenizer, "convert_tokens_to_ids"):
        return False
    if getattr(tokenizer, "add_bos_token", None) is True:
        return True
    ids = tokenizer("x", verbose=False)["input_ids"]
    return bool(ids) and int(ids[0]) == int(bos)


def bos_id(tokenizer: Any, bos: str = "auto", model: Any = None) -> int | None:
    """The token every window starts with under ``bos`` ("auto", "always", "never"), or None when
    windows are cut from one token stream.

    ``"always"`` takes the tokenizer's BOS token, else ``model.config.bos_token_id``.

    Raises:
        ValueError: an unknown mode, or ``"always"`` without any BOS token.
    """
    if bos not in BOS_MODES:
        raise ValueError(f"bos must be one of {', '.join(BOS_MODES)}, got {bos!r}")
    if bos == "never" or (bos == "auto" and not expects_bos(tokenizer)):
        return None
    token = getattr(tokenizer, "bos_token_id", None)
    if token is None:
        token = getattr(getattr(model, "config", None), "bos_token_id", None)
    if token is None:
        raise ValueError("bos='always' needs a BOS token, but neither the tokenizer nor the model's config has one; use bos='never'")
    return int(token)


def with_bos(rows: torch.Tensor, token: int | None) -> torch.Tensor:
    """``rows`` (n, L) with ``token`` prepended to each as a column, giving (n, L + 1); unchanged when None."""
    if token is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), token, dtype=rows.dtype), rows], dim=1)


def protocol(mode: str, token: int | None) -> dict[str, Any]:
    """What a report records about the windows: the mode asked for, the BOS id used (None: one
    token stream) and the rule in words."""
    rule = (
        f"every window is BOS (id {token}) + seqlen-1 text tokens; BOS is never a target"
        if token is not None
        else "windows of seqlen tokens cut from one token stream (SparseGPT/Wanda protocol)"
    )
    return {"bos": mode, "bos_token_id": token, "windows": rule}
