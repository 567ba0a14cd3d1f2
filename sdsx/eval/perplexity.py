"""Perplexity: tokenize the joined text once, cut it into non-overlapping windows (each starting
with BOS where the model expects one, else plain slices of one token stream: the SparseGPT/Wanda
protocol), PPL = exp(mean next-token NLL over every predicted token)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sdsx.data.bos import bos_id, with_bos
from sdsx.data.calibration import encode
from sdsx.model.blocks import max_positions, vocab_size

__all__ = ["evaluating_on", "perplexity", "window_nll"]


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


@contextlib.contextmanager
def evaluating_on(model: nn.Module, device: torch.device | str | None = None) -> Iterator[torch.device]:
    """The model in eval mode on ``device`` (default: where it is) for the block, then back where
    and how it was; yields the device."""
    home = next(model.parameters()).device
    run_on = torch.device(device) if device is not None else home
    training = model.training
    model.eval()
    if run_on != home:
        model.to(run_on)
    try:
        yield run_on
    finally:
        if run_on != home:
            model.to(home)
        model.train(training)


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLLs (fp32) of each row of ``windows`` (b, L) -> (b,)."""
    logits = _logits(model(input_ids=windows, use_cache=False)).float()
    # Shift the targets rather than the logits: slicing the (b, L, vocab) logits would copy them.
    target = torch.full_like(windows, -100)
    target[:, :-1] = windows[:, 1:]
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(windows.shape[0], -1).sum(1)


def perplexity(  # noqa: PLR0913
    model: nn.Module,
    text_or_ids: "str | torch.Tensor",
    tokenizer: Any = None,
    seqlen: int = 2048,
    batch_size: int = 4,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    bos: str = "auto",
) -> float:
    """Perplexity of ``model`` on a text (DESIGN.md section 4).

    The text is tokenized once and split into non-overlapping windows of ``seqlen`` tokens (the
    tail shorter than a window is dropped); each window is scored on its own, predicting tokens
    1..L-1 from their prefix, so every window scores L-1 tokens. How a window starts is ``bos``
    (:mod:`sdsx.data.bos`):

    * a BOS token (``"auto"`` when the tokenizer starts texts with one, or ``"always"``): the text is
      tokenized without special tokens and cut into slices of L-1 tokens, each after its own BOS;
      BOS is context only, never a target, and every text token is scored once;
    * one token stream (``"never"``, or ``"auto"`` for a tokenizer without BOS, or token ids without a
      tokenizer): the text is tokenized with the tokenizer's defaults and cut into slices of L
      tokens, the published SparseGPT/Wanda protocol.

    Args:
        model: a causal LM returning logits.
        text_or_ids: the evaluation text (see :func:`sdsx.data.load_text`) or its token ids (1-D or
            (1, n)); a leading BOS in given ids is dropped when windows get their own.
        tokenizer: needed when a text is given; with token ids, it decides ``bos="auto"``.
        seqlen: window length; capped at the model's maximum positions.
        batch_size: windows per forward call.
        max_windows: evaluate only the first this many windows (quick checks).
        device: where to run; default the model's device (the model is moved there and back).
        progress: show a tqdm bar.
        bos: "auto" (default), "always" or "never", as above.
    Returns:
        exp(mean NLL over all predicted tokens).
    """
    from tqdm.auto import tqdm

    token = bos_id(tokenizer, bos, model)
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ValueError("perplexity of a text needs the model's tokenizer (tokenizer=...)")
        ids = encode(tokenizer, text_or_ids, special_tokens=token is None)
    elif isinstance(text_or_ids, torch.Tensor):
        ids = text_or_ids.reshape(-1).long()
        if token is not None and ids.numel() and int(ids[0]) == token:
            ids = ids[1:]  # the stream's own BOS from a default encoding: each window gets one
    else:
        raise TypeError(f"text_or_ids must be a str or a LongTensor of token ids, got {type(text_or_ids).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = max_positions(model)
    if limit is not None:
        seqlen = min(seqlen, limit)
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 to predict a token, got {seqlen}")
    vocab = vocab_size(model)
    if vocab is not None and ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(
            f"token ids range over [{int(ids.min())}, {int(ids.max())}] but the model's vocabulary has {vocab} "
            "entries: the tokenizer does not match the model"
        )
    width = seqlen - (token is not None)
    count = ids.numel() // width
    if max_windows is not None:
        count = min(count, int(max_windows))
    if count < 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    windows = with_bos(ids[: count * width].view(count, width), token)

    total = 0.0
    with evaluating_on(model, device) as run_on:
        for start in tqdm(range(0, count, batch_size), desc="perplexity", unit="batch", disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(run_on)
            total += float(window_nll(model, batch).double().sum())
    return math.exp(total / (count * (seqlen - 1)))
