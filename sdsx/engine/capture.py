"""Capture of the first block's inputs: calibration ids as batches, the model run up to block 0 (and
the first block of every attention kind) with hooks that record the blocks' inputs and arguments,
the exception that stops it there, and the cleaning of captured arguments (detached tensors, no KV
caches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["CaptureTarget", "Captured", "as_batches", "capture_inputs", "clean_arguments", "is_cache", "pass_through"]


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


@dataclass(frozen=True)
class CaptureTarget:
    """The model whose block inputs are captured: its decoder ``blocks`` at the dotted ``path``,
    and ``kinds`` (id(block) -> attention kind, :func:`sdsx.model.blocks.layer_kinds`)."""

    model: nn.Module
    blocks: nn.ModuleList
    path: str
    kinds: dict[int, Any]


def _move_outside_blocks(target: CaptureTarget, device: torch.device) -> list[tuple]:
    """Move every parameter and buffer that is not inside a block (embeddings, rotary tables,
    final norm, head) to ``device``; return what moved so that it can be put back."""
    inside = {id(m) for m in target.blocks.modules()}
    moved: list[tuple] = []
    for module in target.model.modules():
        if id(module) in inside:
            continue
        for p in module._parameters.values():
            if p is not None and p.device != device:
                moved.append(("param", p, p.device))
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                moved.append(("buffer", (module, name), b.device))
                module._buffers[name] = b.to(device)
    return moved

def _restore(moved: list[tuple]) -> None:
    for kind, obj, device in reversed(moved):
        if kind == "param":
            obj.data = obj.data.to(device)
        else:
            module, name = obj
            module._buffers[name] = module._buffers[name].to(device)

def capture_inputs(
    target: CaptureTarget, batches: Sequence[torch.Tensor], device: torch.device, store_device: torch.device,
) -> tuple[list[torch.Tensor], dict[tuple, tuple]]:
    """Run the model up to block 0 for every batch (for a model that mixes attention kinds, up to
    the first block of every kind, the blocks before it passing their input through unchanged).

    Returns:
        (hidden-state inputs of block 0, one (b, L, hidden) tensor per batch on the store
        device; {input shape: (extra positional args, keyword args)} the model passes to block
        0, and {(kind, input shape): ...} to the blocks of each kind, with KV caches removed).
    """
    inputs: list[torch.Tensor] = []
    arguments: dict[tuple, tuple] = {}
    firsts: dict[int, str] = {}  # block index -> its kind, for the first block of every kind
    for index, block in enumerate(target.blocks):
        kind = target.kinds[id(block)]
        if kind is not None and kind not in firsts.values():
            firsts[index] = kind
    last = max(firsts, default=0)
    shape: list[tuple] = []  # block 0's input shape in this batch

    def make_pre_hook(index: int) -> Callable:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if index == 0:
                inputs.append(hidden.detach().to(store_device, copy=hidden.device == store_device))
                shape[:] = [tuple(hidden.shape)]
                arguments.setdefault(shape[0], (clean_arguments(rest), clean_arguments(kwargs)))
            if index in firsts:
                arguments.setdefault((firsts[index], shape[0]), (clean_arguments(rest), clean_arguments(kwargs)))
            if index == last:
                raise Captured

        return pre_hook

    handles = [target.blocks[i].register_forward_pre_hook(make_pre_hook(i), with_kwargs=True) for i in sorted({0, *firsts})]
    for block in target.blocks[:last]:
        block.forward = pass_through  # an instance attribute: nn.Module.__call__ runs it instead
    moved = _move_outside_blocks(target, device)
    try:
        for ids in batches:
            try:
                target.model(input_ids=ids.to(device), use_cache=False)
            except Captured:
                continue
            raise RuntimeError(
                f"{type(target.model).__name__} returned without calling its first decoder block "
                f"({target.path}.0); sdsx cannot capture the block inputs of this model"
            )
    finally:
        for handle in handles:
            handle.remove()
        for block in target.blocks[:last]:
            del block.forward
        _restore(moved)
    return inputs, arguments
