"""Block-level reconstruction with fixed masks: fit a pruned decoder block's output to a target.

After every linear of a block has been pruned (each against its own layer-wise objective), the
block's output still drifts from the dense model's, because the layers' errors compose (through
attention, the gated MLP and the residual stream) and because each layer was fitted to inputs that
the earlier layers of the same block no longer produce. This step runs a few Adam steps on the
block's kept weights, masks fixed, minimising the per-token relative error of the block's output
against a target hidden state, over the calibration batches:

- ``target="dense"``: the dense model's hidden state after this block (the dense model run on
  the dense stream), so the block also undoes what the blocks before it got wrong;
- ``target="local"``: the dense block applied to the pruned model's input of this block, the
  block's own error only.

With validation windows, the fit is scored on the validation windows' deviation from the dense
hidden state (after the last step, or every ``eval_every`` steps) and the best iterate is kept
(the starting weights included), so the step cannot make a block worse on held-out text.

The algorithm is the pure function :func:`fit_block`; the driver supplies the block's forward
pass and the data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "DEVIATIONS", "BlockFitOptions", "BlockFitRecord", "as_block_fit", "channel_weights", "fit_block", "relative_error",
    "visit_order", "visited",
]

TARGETS = ("dense", "local")
LR_MODES = ("absolute", "relative")
#: How a block's deviation from the dense model is measured (the block guard, the block fit's loss
#: and its choice of iterate): "balanced" weighs every hidden channel by the inverse of its dense RMS
#: (:func:`channel_weights`), "plain" by its own size.
DEVIATIONS = ("balanced", "plain")


@dataclass(frozen=True)
class BlockFitOptions:
    """Settings of the block-level fit.

    Attributes:
        epochs: passes over the calibration batches (one Adam step per batch); fractions allowed.
            Default 0.5, the most that keeps SDS within 3x its base pruner's time (SmolLM2-135M,
            Wanda 2:4, validation ppl 53.75 at 0.5, 52.23 at 0.75, 50.43 at 1; docs/sds.md).
        lr: Adam's learning rate on the kept weights: an absolute step (``lr_mode="absolute"``) or
            a fraction of each weight tensor's RMS (``lr_mode="relative"``).
        lr_mode: "absolute" or "relative". Adam's step does not depend on the gradient's scale,
            so an absolute rate moves small weights further, relatively: SmolLM2-135M's linears
            have an RMS of about 0.19, Gemma-3-270M's 0.016-0.040, and the same 3e-4 was a step 5
            to 12 times larger for Gemma. A relative rate is the same step for every model.
        target: "dense" (the dense model's hidden state) or "local" (the dense block on the
            pruned input); see the module docstring. Dense: validation ppl 50.43 against 56.12.
        eval_every: steps between validation checks (when validation windows are given); None
            (the default): only after the last step, so the kept weights are the better of the
            start and the end (in 356 of 360 measured block fits the last step was the best).
        patience: validation checks without improvement before the fit stops.
        seed: seeds the order in which the batches are visited.
    """

    epochs: float = 0.5
    lr: float = 3e-4
    lr_mode: str = "absolute"
    target: str = "dense"
    eval_every: int | None = None
    patience: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"block fit target must be one of {TARGETS}, got {self.target!r}")
        if not self.epochs > 0:
            raise ValueError(f"block fit epochs must be > 0, got {self.epochs}")
        if self.lr_mode not in LR_MODES:
            raise ValueError(f"block fit lr_mode must be one of {LR_MODES}, got {self.lr_mode!r}")
        if not self.lr > 0:
            raise ValueError(f"block fit lr must be > 0, got {self.lr}")
        if (self.eval_every is not None and self.eval_every < 1) or self.patience < 1:
            raise ValueError(f"block fit eval_every and patience must be >= 1, got {self.eval_every} and {self.patience}")


def as_block_fit(value: "BlockFitOptions | dict[str, Any] | bool | None") -> BlockFitOptions | None:
    """Normalise the user's ``block_fit=`` argument: None/False (off), True (the defaults), a dict
    of :class:`BlockFitOptions` fields, or the options themselves."""
    if value is None or value is False:
        return None
    if value is True:
        return BlockFitOptions()
    if isinstance(value, BlockFitOptions):
        return value
    if isinstance(value, dict):
        known = set(BlockFitOptions.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown block fit option(s) {unknown}; known: {sorted(known)}")
        return BlockFitOptions(**value)
    raise TypeError(f"block_fit must be None, a bool, a dict of options or BlockFitOptions, got {type(value).__name__}")


@dataclass
class BlockFitRecord:
    """What one block's fit did: steps taken, the step whose weights were kept (0: the starting
    weights), the training loss of the first and last steps, and the validation deviation of the
    starting and kept weights (None without validation)."""

    block: int
    steps: int
    best_step: int
    loss_first: float
    loss_last: float
    val_before: float | None = None
    val_after: float | None = None
    seconds: float = 0.0
    history: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def relative_error(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of ||w * (out - target)||^2 / ||w * target||^2 (differentiable in ``out``).

    Per token, so that the few tokens with massive activations (the attention sink) do not drown
    the rest. ``weight`` (one factor per hidden channel, see :func:`channel_weights`) balances the
    channels: without it a handful of outlier channels can hold almost all of a token's norm
    (Gemma-3-270M: 4 of 640 channels hold 85-98% of it after every block), and the error then
    measures those channels alone."""
    out, target = out.float(), target.to(out.device).float()
    diff = out - target
    if weight is not None:
        weight = weight.to(out.device, torch.float32)
        diff, target = diff * weight, target * weight
    num = diff.pow(2).sum(-1)
    den = target.pow(2).sum(-1).clamp_min(1e-20)
    return (num / den).mean()


def channel_weights(hidden: Sequence[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """One factor per hidden channel, the inverse of the channel's root-mean-square over the tokens
    of ``hidden`` (the dense model's hidden states after a block, (b, L, d) tensors), the first
    position of every window left out (the attention sink's massive values would set the scale of
    its channels). With them every channel counts about equally in :func:`relative_error`, as
    it does for the RMS norms that read the residual stream through their own gains."""
    total, count = None, 0
    for h in hidden:
        x = h[:, 1:] if h.dim() == 3 and h.shape[1] > 1 else h
        x = x.reshape(-1, x.shape[-1]).float()
        sq = x.pow(2).sum(0)
        total = sq if total is None else total + sq.to(total.device)
        count += x.shape[0]
    if total is None or count == 0:
        raise ValueError("channel_weights needs at least one hidden state")
    rms = (total / count).sqrt()
    floor = eps * float(rms.max()) + 1e-30
    return 1.0 / rms.clamp_min(floor)


def _kept_rms(w: torch.Tensor, mask: torch.Tensor) -> float:
    kept = int(mask.sum())
    return float(w.pow(2).sum() / kept) ** 0.5 if kept else 0.0


def visit_order(count: int, options: BlockFitOptions) -> list[int]:
    """The calibration batches the fit visits, in order: ``round(epochs * count)`` steps (at least
    one), seeded permutations of the ``count`` batches back to back. The same for every block, so
    with ``epochs < 1`` the driver advances the dense stream only for the batches in it."""
    steps = max(1, round(options.epochs * count))
    gen = torch.Generator().manual_seed(options.seed)
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(count, generator=gen).tolist()
    return order[:steps]


def visited(count: int, options: BlockFitOptions) -> list[int]:
    """The distinct batches :func:`visit_order` visits, ascending: the windows whose dense hidden
    states the fit needs."""
    return sorted(set(visit_order(count, options)))


def fit_block(  # noqa: PLR0913
    forward: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    weights: dict[str, torch.Tensor],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor | None],
    options: BlockFitOptions,
    validate: Callable[[dict[str, torch.Tensor]], float] | None = None,
    block: int = -1,
    start: float | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], BlockFitRecord]:
    """Fit the kept entries of ``weights`` so that ``forward(weights, x)`` approaches the targets.

    Args:
        forward: ``(weights by name, input batch) -> output batch``, differentiable in the weights
            (the driver uses ``torch.func.functional_call`` of the block).
        weights: the pruned weights by parameter name; their zeros are the masks, kept fixed.
        inputs, targets: the calibration batches and the hidden states to approach; a target may
            be None for a batch that :func:`visit_order` does not visit.
        options: see :class:`BlockFitOptions`.
        validate: ``weights -> deviation`` on held-out windows; the best iterate is kept.
        block: the block's index, for the record.
        start: ``validate`` of the starting weights when the caller already knows it (saves a pass).
        weight: per-channel factors of the loss (:func:`relative_error`); None weighs channels by
            their own size.
    Returns:
        The kept weights (same dtypes and devices as given) and a :class:`BlockFitRecord`.
    """
    if len(inputs) != len(targets) or not inputs:
        raise ValueError(f"block fit needs matching, non-empty inputs and targets, got {len(inputs)} and {len(targets)}")
    dtypes = {k: w.dtype for k, w in weights.items()}
    masks = {k: w != 0 for k, w in weights.items()}
    # fp32 master copies: Adam's small steps vanish in bf16/fp16 weights
    params = {k: w.detach().float().clone().requires_grad_(True) for k, w in weights.items()}
    if options.lr_mode == "relative":
        # one group per tensor, each step a fraction of the tensor's RMS over its kept entries
        groups = [{"params": [p], "lr": options.lr * _kept_rms(p.detach(), masks[k])} for k, p in params.items()]
        opt = torch.optim.Adam(groups, lr=options.lr)
    else:
        opt = torch.optim.Adam(params.values(), lr=options.lr)

    def current() -> dict[str, torch.Tensor]:
        return {k: p.to(dtypes[k]) for k, p in params.items()}

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: p.detach().to(dtypes[k]).clone() for k, p in params.items()}

    order = visit_order(len(inputs), options)
    steps = len(order)
    missing = sorted({i for i in order if targets[i] is None})
    if missing:
        raise ValueError(f"block fit: no target for the visited batches {missing}")
    record = BlockFitRecord(block=block, steps=0, best_step=0, loss_first=float("nan"), loss_last=float("nan"))
    best = snapshot() if validate is not None else None
    if validate is not None:
        if start is None:
            with torch.no_grad():
                start = float(validate(current()))
        record.val_before = record.val_after = float(start)
        record.history.append((0, record.val_before))
    stale = 0
    for step, i in enumerate(order, start=1):
        with torch.enable_grad():
            loss = relative_error(forward(current(), inputs[i]), targets[i], weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        with torch.no_grad():
            for k, p in params.items():
                p.mul_(masks[k])
        value = float(loss.detach())
        if step == 1:
            record.loss_first = value
        record.loss_last = value
        record.steps = step
        if validate is not None and ((options.eval_every and step % options.eval_every == 0) or step == steps):
            with torch.no_grad():
                dev = float(validate(current()))
            record.history.append((step, dev))
            if dev < record.val_after:
                record.val_after, record.best_step, best, stale = dev, step, snapshot(), 0
            else:
                stale += 1
                if stale >= options.patience:
                    break
    if best is None:
        record.best_step = record.steps
        best = snapshot()
    return best, record
