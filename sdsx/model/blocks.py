"""Find the decoder blocks of a causal LM and the linear layers inside them, for any family we know.

Weights are exchanged in the (out, in) layout of nn.Linear; GPT-2's Conv1D stores (in, out) and is
transposed on the way in and out. Embeddings and the LM head live outside the blocks and are never
returned.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "BLOCK_PATHS",
    "find_blocks",
    "find_linears",
    "model_linears",
    "is_conv1d",
    "get_weight",
    "set_weight",
    "in_features",
    "layer_kinds",
    "vocab_size",
    "max_positions",
]

# Attribute paths (relative to the object the user passes) where families keep their decoder
# blocks. The first that resolves to a non-empty nn.ModuleList wins.
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # LLaMA, SmolLM2, Mistral, Qwen2, Gemma, Phi-3 (…ForCausalLM)
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "layers",  # a bare LlamaModel
    "decoder.layers",  # a bare OPTModel
    "h",  # a bare GPT2Model
)


class Blocks(NamedTuple):
    """The decoder blocks and where they were found (``path`` is e.g. ``"model.layers"``)."""

    layers: nn.ModuleList
    path: str


def _resolve(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> Blocks:
    """Locate the decoder blocks of ``model``.

    Raises:
        ValueError: no known attribute path holds a non-empty ``nn.ModuleList``; the message lists
            the paths tried.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    empty = []
    for path in BLOCK_PATHS:
        layers = _resolve(model, path)
        if isinstance(layers, nn.ModuleList):
            if len(layers) > 0:
                return Blocks(layers, path)
            empty.append(path)
    detail = f" ({', '.join(empty)} exist but are empty)" if empty else ""
    raise ValueError(
        f"{type(model).__name__} has no decoder blocks that sdsx recognises: looked for a non-empty "
        f"nn.ModuleList at {', '.join('model.' + p for p in BLOCK_PATHS)}{detail}. Pass a causal LM "
        "such as LlamaForCausalLM, OPTForCausalLM or GPT2LMHeadModel."
    )


def layer_kinds(model: nn.Module, blocks: nn.ModuleList) -> list[str | None]:
    """Each block's attention kind where the model mixes kinds (Gemma 2/3, OLMo 3 and Qwen with
    sliding-window layers: "sliding_attention" / "full_attention"), else None for every block.

    The model builds one attention mask (and, for Gemma 3, one rotary table) per kind and hands each
    block its own, so a block must be replayed with the arguments of its kind. Read from the config's
    ``layer_types`` (transformers 5), else from each block's ``attention_type``.
    """
    config = getattr(model, "config", None)
    text_config = getattr(config, "get_text_config", None)
    config = text_config() if callable(text_config) else config
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(kinds) == len(blocks):
        found = [str(k) for k in kinds]
    else:
        found = [getattr(b, "attention_type", None) for b in blocks]
    return found if len(set(found)) > 1 else [None] * len(blocks)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out).

    Matched by name and shape rather than by import, so this module does not need transformers.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def find_linears(block: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """All nn.Linear and Conv1D layers inside ``block``, by qualified name, in module order."""
    found: dict[str, nn.Module] = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            found[f"{prefix}.{name}" if prefix else name] = module
    return found


def model_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable linear of every decoder block, by qualified name, in order."""
    blocks, path = find_blocks(model)
    out: dict[str, nn.Module] = {}
    for index, block in enumerate(blocks):
        out.update(find_linears(block, prefix=f"{path}.{index}"))
    return out


def in_features(module: nn.Module) -> int:
    """Number of inputs of a linear layer (columns of its (out, in) weight)."""
    return int(module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1])


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) tensor: the parameter's own data for nn.Linear (do not mutate
    it), a contiguous transposed copy for Conv1D."""
    w = module.weight.detach()
    return w.t().contiguous() if is_conv1d(module) else w


@torch.no_grad()
def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out, in) weight back into the module's parameter in place, keeping its dtype,
    device and identity (optimizers and tied references keep working)."""
    target = module.weight
    new = weight.t() if is_conv1d(module) else weight
    if tuple(new.shape) != tuple(target.shape):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit layer {tuple(target.shape)}")
    target.copy_(new.to(device=target.device, dtype=target.dtype))


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the input embedding (what token ids must stay below), or None when unknown."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    return int(size) if size else None


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model accepts (learned position tables: OPT, GPT-2), or None."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
