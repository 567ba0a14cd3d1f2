"""Calibration token windows: N sequences of L tokens sampled with a seed from a text source."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sdsx.data.bos import bos_id, with_bos
from sdsx.data.text import HUB_DATASETS, hub_rows, join_rows, read_local
from sdsx.defaults import CALIB_NSAMPLES, CALIB_SEQLEN

log = logging.getLogger("sdsx")

__all__ = ["calibration", "encode", "held_out"]


def encode(tokenizer: Any, text: str, special_tokens: bool = True) -> torch.Tensor:
    """Token ids (1-D LongTensor) of ``text``: a Hugging Face tokenizer, or any callable str -> ids.

    ``special_tokens=False`` leaves out what the tokenizer adds by default (a leading BOS), for
    windows that get their own BOS; a plain callable is called as it is.
    """
    if hasattr(tokenizer, "__call__") and hasattr(tokenizer, "convert_tokens_to_ids"):
        # verbose=False: the whole corpus is longer than model_max_length on purpose; the
        # "sequence too long" warning does not apply because we cut windows ourselves.
        ids = tokenizer(text, add_special_tokens=special_tokens, verbose=False)["input_ids"]
    elif callable(tokenizer):
        ids = tokenizer(text)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
    else:
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer or a callable, got {type(tokenizer).__name__}")
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _windows(ids: torch.Tensor, nsamples: int, width: int, generator: torch.Generator, what: str) -> torch.Tensor:
    """``nsamples`` random windows of ``width`` text tokens (seqlen, or seqlen - 1 before a BOS)."""
    total = ids.numel()
    if total < width:
        raise ValueError(
            f"not enough calibration text: {what} has {total} tokens, but one window needs at least {width} text "
            "tokens; give more text or ask for a shorter seqlen"
        )
    if total < nsamples * width:
        log.info("calibration: %d windows of %d tokens from %d tokens overlap", nsamples, width, total)
    starts = torch.randint(0, total - width + 1, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + width] for s in starts.tolist()])


def _c4_windows(tokenizer: Any, nsamples: int, width: int, generator: torch.Generator, special_tokens: bool) -> torch.Tensor:
    # The SparseGPT protocol for C4: a random document long enough, then a random window in it
    # (C4 is too large to tokenize as one text).
    rows = hub_rows("c4", "train")
    out = []
    for _ in range(100 * nsamples):
        if len(out) == nsamples:
            break
        doc = rows[int(torch.randint(0, len(rows), (1,), generator=generator))]
        ids = encode(tokenizer, doc, special_tokens)
        if ids.numel() > width:
            s = int(torch.randint(0, ids.numel() - width + 1, (1,), generator=generator))
            out.append(ids[s : s + width])
    if len(out) < nsamples:
        raise ValueError(f"C4: found only {len(out)} documents longer than {width} tokens")
    return torch.stack(out)


def _source_text(source: "str | os.PathLike | Iterable[str]") -> tuple[str | None, str]:
    """The one text a calibration source names and a label for messages; ``None`` for C4 (documents)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            return read_local(path)[0], str(path)
        name = str(source).lower()
        if name in HUB_DATASETS:
            if name == "c4":
                return None, "c4 (train)"
            return join_rows(hub_rows(name, HUB_DATASETS[name][2]), " " if name == "ptb" else "\n\n"), f"{name} (train)"
        raise FileNotFoundError(
            f"calibration source {str(source)!r} is neither an existing file nor a known dataset "
            f"name ({', '.join(sorted(HUB_DATASETS))})"
        )
    rows = list(source)
    if not all(isinstance(r, str) for r in rows):
        raise TypeError("an iterable calibration source must yield strings")
    return join_rows(rows), "the given text"


def _check_holdout(holdout: float) -> float:
    if not isinstance(holdout, (int, float)) or not 0.0 <= float(holdout) < 1.0:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    return float(holdout)


def _cut(ids: torch.Tensor, holdout: float) -> int:
    """Where the held-out tail of a token stream starts: windows come from ``ids[:cut]``."""
    return int(ids.numel() * (1 - holdout))


def calibration(
    source: "str | os.PathLike | Iterable[str]",
    tokenizer: Any,
    nsamples: int = CALIB_NSAMPLES,
    seqlen: int = CALIB_SEQLEN,
    seed: int = 0,
    bos: str = "auto",
    holdout: float = 0.0,
) -> torch.Tensor:
    """Sample ``nsamples`` windows of ``seqlen`` tokens from a text source, reproducibly.

    Args:
        source: a local file (.txt; .jsonl with a "text" field; WikiText .raw), a hub dataset name
            ("c4", "wikitext2", "ptb"; needs a reachable hub and `datasets`), or an iterable of
            strings (joined with blank lines).
        tokenizer: the model's tokenizer (the text is tokenized once, then windows are cut).
        nsamples: number of sequences (default 32, :mod:`sdsx.defaults`; the paper uses 128).
        seqlen: tokens per sequence (default 512; the paper uses 2048).
        seed: seeds a private torch.Generator: the same seed gives the same windows.
        bos: how windows start (:mod:`sdsx.data.bos`): "auto" (default) starts each with the BOS
            token when the tokenizer starts texts with it (a window is then BOS + seqlen - 1 text
            tokens, the text tokenized without special tokens); "always" does so for any tokenizer;
            "never" cuts windows from one token stream (the published SparseGPT/Wanda protocol).
        holdout: the fraction at the end of the text's token stream that no window touches, kept
            for validation (:func:`held_out` returns that tail); 0 (default) uses all of it. Not
            for C4, whose windows come from random documents.
    Returns:
        LongTensor (nsamples, seqlen).
    Raises:
        ValueError: the text (its head, with a holdout) has fewer than ``seqlen`` tokens (the
            message says how many).
    """
    if not isinstance(nsamples, int) or nsamples < 1:
        raise ValueError(f"nsamples must be a positive int, got {nsamples!r}")
    if not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen must be a positive int, got {seqlen!r}")
    holdout = _check_holdout(holdout)
    token = bos_id(tokenizer, bos)
    if token is not None and seqlen < 2:
        raise ValueError(f"a window that starts with BOS needs seqlen >= 2, got {seqlen}; or pass bos='never'")
    width = seqlen - (token is not None)
    generator = torch.Generator().manual_seed(int(seed))
    text, what = _source_text(source)
    if text is None:
        if holdout:
            raise ValueError("C4 calibration draws random documents and has no held-out tail: pass holdout=0")
        return with_bos(_c4_windows(tokenizer, nsamples, width, generator, token is None), token)
    if not text.strip():
        raise ValueError(f"not enough calibration text: {what} is empty (0 tokens; need at least {seqlen})")
    ids = encode(tokenizer, text, special_tokens=token is None)
    if holdout:
        ids, what = ids[: _cut(ids, holdout)], f"the first {1 - holdout:.0%} of {what}"
    return with_bos(_windows(ids, nsamples, width, generator, what), token)


def held_out(source: "str | os.PathLike | Iterable[str]", tokenizer: Any, holdout: float, bos: str = "auto") -> torch.Tensor:
    """The token stream :func:`calibration` with this ``holdout`` and ``bos`` never draws from.

    The last ``holdout`` fraction of the source's tokens (1-D LongTensor), tokenized exactly as the
    calibration windows are, so that calibrating on the head and scoring on this tail (for
    example with :func:`sdsx.perplexity`) never evaluates a calibrated token.
    """
    holdout = _check_holdout(holdout)
    if holdout == 0:
        raise ValueError("held_out needs holdout > 0 (with 0 every token may be calibrated on)")
    text, _ = _source_text(source)
    if text is None:
        raise ValueError("C4 calibration draws random documents and has no held-out tail")
    ids = encode(tokenizer, text, special_tokens=bos_id(tokenizer, bos) is None)
    return ids[_cut(ids, holdout) :]
