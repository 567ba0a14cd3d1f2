"""SDS's guards beyond the calibration text: validation windows from another domain, and the model
guard, which compares what the user gets (the whole model's validation loss) for SDS's weights and
phase 1's.

Why: the block guard and the block fit's choice of iterate compare per-block hidden-state
deviations on windows held out of the calibration text. Both can pass a model that is worse end
to end, and neither sees a text of another domain: on Gemma-3-270M the block fit made the model
better on the calibration text's tail and worse on every other text (issue 26, docs/sds.md).

* :func:`generated_windows`: windows sampled from the dense model itself (seeded, cached by
  :func:`sdsx.data.sources.self_calibration`): text of no corpus's domain, what the dense model
  finds likely, available for any model without a second corpus.
* :func:`window_losses`: mean next-token NLL of the whole model per validation source.
* :func:`choose`: the model guard's rule.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["OTHER_SOURCES", "choose", "generated_windows", "window_losses"]

#: What ``other_validation=`` may name instead of token windows.
OTHER_SOURCES = ("self",)


class _BOS:
    """The one attribute :func:`~sdsx.data.sources.self_calibration` reads of a tokenizer."""

    def __init__(self, token: int | None) -> None:
        self.bos_token_id = token


def _bos_of(model: nn.Module, calib: torch.Tensor) -> int | None:
    """The BOS token the calibration windows start with, when every window starts with the model's
    configured BOS (Gemma, LLaMA-2); else None (one token stream without BOS: SmolLM2's protocol)."""
    token = getattr(getattr(model, "config", None), "bos_token_id", None)
    if token is None or calib.numel() == 0:
        return None
    return int(token) if bool((calib[:, 0] == int(token)).all()) else None


def generated_windows(model: nn.Module, calib: torch.Tensor, count: int, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """``count`` windows as long as the calibration windows, sampled from ``model`` (the dense
    model: call before pruning) at temperature 1, starting with BOS when the calibration windows
    do. Seeded and cached: the same model, shape and seed give the same windows."""
    from sdsx.data.sources import self_calibration

    if count < 1:
        raise ValueError(f"generated validation needs at least one window, got {count}")
    return self_calibration(model, _BOS(_bos_of(model, calib)), nsamples=count, seqlen=int(calib.shape[1]), seed=seed,
                            batch_size=count, progress=progress)


@torch.no_grad()
def window_losses(model: nn.Module, sources: dict[str, torch.Tensor], device: torch.device | str | None = None,
                  batch_size: int = 4) -> dict[str, float]:
    """Mean next-token NLL (nats per predicted token) of ``model`` on each source's (n, L) windows.
    The model runs on ``device`` (default: where it is) and goes back where it was."""
    from sdsx.eval.perplexity import evaluating_on, window_nll

    out = {}
    with evaluating_on(model, device) as run_on:
        for name, windows in sources.items():
            total = 0.0
            for start in range(0, windows.shape[0], batch_size):
                total += float(window_nll(model, windows[start : start + batch_size].to(run_on)).double().sum())
            out[name] = total / (windows.shape[0] * (windows.shape[1] - 1))
    return out


def choose(sds: dict[str, float], phase1: dict[str, float]) -> str:
    """The model guard's rule: SDS's weights ("sds") only when their loss is below phase 1's on
    every validation source, else phase 1's ("phase1"). A NaN loss never wins."""
    better = all(math.isfinite(sds[k]) and (not math.isfinite(phase1[k]) or sds[k] < phase1[k]) for k in phase1)
    return "sds" if better else "phase1"


def describe(entry: dict[str, Any]) -> str:
    """One line for the report: each source's perplexity under both weight sets, and the choice."""
    parts = [f"{k} {math.exp(entry['sds'][k]):.4g} vs {math.exp(entry['phase1'][k]):.4g}" for k in entry["phase1"]]
    return f"model guard (perplexity, SDS vs phase 1): {', '.join(parts)}: kept {entry['chosen']}"
