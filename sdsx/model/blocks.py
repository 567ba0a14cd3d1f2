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
    "BLOCKS_ATTR",
    "find_blocks",
    "use_blocks",
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


#: the attribute :func:`use_blocks` sets on a model: the dotted path of its decoder blocks
BLOCKS_ATTR = "sdsx_blocks"


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
    """Locate the decoder blocks of ``model``: where :func:`use_blocks` pointed, else the first of
    :data:`BLOCK_PATHS` that holds a non-empty ``nn.ModuleList``.

    Raises:
        ValueError: no blocks found (the message lists the paths tried, the module lists that look
            like blocks, and how to point sdsx at them: ``blocks="model.layers"``); or a
            mixture-of-experts model (the message names its type), which sdsx does not prune.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen = getattr(model, BLOCKS_ATTR, None)
    empty = []
    for path in (chosen,) if chosen else BLOCK_PATHS:
        layers = _resolve(model, path)
        if isinstance(layers, nn.ModuleList):
            if len(layers) > 0:
                _refuse_experts(model, layers, path)
                return Blocks(layers, path)
            empty.append(path)
    detail = f" ({', '.join(empty)} exist but are empty)" if empty else ""
    found = _block_lists(model)
    example = found[0] if found else "model.layers"
    seen = f"; nn.ModuleLists of linear layers here: {', '.join(found[:4])}" if found else ""
    tried = f'blocks="{chosen}"' if chosen else ", ".join("model." + p for p in BLOCK_PATHS)
    raise ValueError(
        f"{type(model).__name__} has no decoder blocks that sdsx recognises: looked for a non-empty nn.ModuleList at "
        f"{tried}{detail}{seen}; point sdsx at them with blocks=\"{example}\" (the path from the model: "
        "sdsx.prune(..., blocks=...), sdsx.sds_prune(..., blocks=...), the CLI's --blocks, or sdsx.use_blocks(model, path))"
    )


def use_blocks(model: nn.Module, path: str) -> Blocks:
    """Point sdsx at the decoder blocks of a model whose layout it does not know.

    ``path`` is the dotted attribute path from ``model`` to the ``nn.ModuleList`` of blocks (e.g.
    ``"backbone.layers"``). It is kept on the model (attribute ``sdsx_blocks``), so that every later
    call (pruning, saving, checking a pattern) finds the same blocks.

    Raises:
        ValueError: ``path`` does not lead to a non-empty ``nn.ModuleList``.
    """
    if not isinstance(path, str) or not path.strip():
        raise TypeError(f'blocks must be a dotted attribute path such as "model.layers", got {path!r}')
    layers = _resolve(model, path)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        what = "nothing" if layers is None else "an empty nn.ModuleList" if isinstance(layers, nn.ModuleList) else type(layers).__name__
        found = _block_lists(model)
        hint = f"; nn.ModuleLists of linear layers here: {', '.join(found[:4])}" if found else ""
        raise ValueError(f'blocks="{path}" finds {what} in {type(model).__name__}, not a non-empty nn.ModuleList of blocks{hint}')
    object.__setattr__(model, BLOCKS_ATTR, path)
    return find_blocks(model)


def _block_lists(model: nn.Module) -> list[str]:
    """Paths of the non-empty nn.ModuleLists in ``model`` whose first entry holds a linear layer."""
    out = []
    for name, module in model.named_modules():
        if name and isinstance(module, nn.ModuleList) and len(module) and find_linears(module[0]):
            out.append(name)
    return out


def _refuse_experts(model: nn.Module, layers: nn.ModuleList, path: str) -> None:
    """Raise for a mixture-of-experts model: its experts are fused 3-D parameters (transformers 5)
    or lists of MLPs that see only the tokens routed to them, so pruning them with the block's
    statistics, or pruning only the attention and reporting the model pruned, would be wrong."""
    config = getattr(model, "config", None)
    counts = {getattr(config, a, None) for a in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")}
    counts = {c for c in counts if isinstance(c, int) and c > 1}
    for index, block in enumerate(layers):
        for name, module in block.named_modules():
            cls = type(module).__name__
            # a 3-D parameter with one slice per expert (not, e.g., a convolution's kernel)
            fused = any(p.dim() >= 3 and p.shape[0] in counts for p in module.parameters(recurse=False))
            if fused or name.rsplit(".", 1)[-1] == "experts" or cls.endswith(("Experts", "MoE")) or "SparseMoe" in cls:
                kind = getattr(config, "model_type", None)
                raise ValueError(
                    f"{type(model).__name__} (model_type {kind!r}) is a mixture-of-experts model ({cls} at {path}.{index}.{name}): "
                    "sdsx does not prune experts yet (each expert needs the statistics of the tokens routed to it, and "
                    "pruning only the rest would leave most weights dense); prune a dense model"
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
