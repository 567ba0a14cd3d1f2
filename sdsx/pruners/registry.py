"""The registry of layer-wise pruners: a pruner is one pure function plus one registration.

A pruner module defines its options dataclass and a solve function, and registers them::

    register(Pruner("wanda", solve, stats="diag", options=WandaOptions, summary="|W| * ||X_j||"))

``solve(weight, stats, spec, options, context) -> PruneResult`` is called once per linear:

- ``weight``: the (out, in) weight, never modified;
- ``stats``: H = X X^T / T (in, in) of the layer's calibration inputs, or its diagonal (in,) when
  the pruner registered ``stats="diag"`` and no caller asked for the full H (None with
  ``stats="none"``); a solve that registered "diag" must accept both;
- ``spec``: the parsed :class:`~sdsx.pruners.spec.SparsitySpec`;
- ``options``: an instance of the registered options dataclass;
- ``context``: a :class:`LayerContext` (the layer's name, the run's shared state, whether the
  layer error tr(D H D^T) is wanted).

Everything that lists pruners (``sdsx.prune``'s methods, SDS's phase-1/3 pruners, the command
line's choices, the contract suite in tests/test_contract.py) reads this registry, so a new pruner
is its own file plus its module's name in :data:`BUILTIN`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from sdsx.pruners.base import PruneResult
from sdsx.pruners.spec import SparsitySpec

__all__ = [
    "BUILTIN", "STATS", "LayerContext", "Pruner", "get", "make_options", "names", "option_help", "register", "sds_names",
]

# the modules of the built-in pruners, imported on first use (each registers itself)
BUILTIN = (
    "sdsx.pruners.magnitude",
    "sdsx.pruners.wanda",
    "sdsx.pruners.sparsegpt",
    "sdsx.pruners.ria",
)
STATS = ("none", "diag", "full")


@dataclass(frozen=True)
class LayerContext:
    """What a solve may use beyond the weight and the statistics.

    name: the linear's qualified name (for messages).
    shared: the run's shared state, built once per run by the pruner's ``shared`` factory (e.g.
        SparseGPT's :class:`~sdsx.pruners.sparsegpt.FactorCache`, reused by the linears that read one
        input), or None.
    need_loss: whether the returned ``loss`` (tr(D H D^T)) is wanted; False lets a solve skip it
        (NaN).
    """

    name: str = "layer"
    shared: Any = None
    need_loss: bool = True


Solve = Callable[[torch.Tensor, "torch.Tensor | None", SparsitySpec, Any, LayerContext], PruneResult]


@dataclass(frozen=True)
class Pruner:
    """A registered layer-wise pruner.

    name: what users type (``sdsx.prune(method=...)``, ``--method``, ``--pruner``).
    solve: the pure function (see the module docstring).
    stats: the least statistics it needs: "none" (weights alone), "diag" (the inputs' squared
        column norms, H's diagonal) or "full" (H).
    options: its options dataclass (every field with a default); ``options()`` are the defaults.
    summary: one line for ``--help`` and the docs.
    shared: builds the run's shared state from the options (see :class:`LayerContext`), or None.
    sds: whether SDS may use it as its phase-1/3 pruner.
    """

    name: str
    solve: Solve
    stats: str
    options: type
    summary: str
    shared: Callable[[Any], Any] | None = None
    sds: bool = True

    def __post_init__(self) -> None:
        if self.stats not in STATS:
            raise ValueError(f"pruner {self.name!r}: stats must be one of {STATS}, got {self.stats!r}")
        if not self.name or not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"pruner names are lower-case identifiers, got {self.name!r}")

    def stats_for(self, need_loss: bool) -> str:
        """The statistics a run collects for it: the full H when the layer error is wanted."""
        return "full" if need_loss else self.stats


_REGISTRY: dict[str, Pruner] = {}
_loaded = False


def register(pruner: Pruner) -> Pruner:
    """Add ``pruner`` to the registry (a second registration of one name is refused)."""
    if pruner.name in _REGISTRY and _REGISTRY[pruner.name] is not pruner:
        raise ValueError(f"a pruner named {pruner.name!r} is already registered")
    _REGISTRY[pruner.name] = pruner
    return pruner


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(module)


def names() -> tuple[str, ...]:
    """Every registered pruner's name: the built-in ones in :data:`BUILTIN`'s order, then the others
    in registration order."""
    _load()
    order = {module: i for i, module in enumerate(BUILTIN)}
    return tuple(sorted(_REGISTRY, key=lambda n: order.get(_REGISTRY[n].solve.__module__, len(order))))


def sds_names() -> tuple[str, ...]:
    """The pruners SDS may use for its phases 1 and 3 (in :func:`names`' order)."""
    return tuple(n for n in names() if _REGISTRY[n].sds)


def get(name: str) -> Pruner:
    """The pruner registered as ``name``; a ValueError naming the choices otherwise."""
    _load()
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown pruner {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def make_options(pruner: Pruner, given: Any = None, **defaults: Any) -> Any:
    """The options a user asked for: ``given`` is None, an instance of the pruner's options
    dataclass, or a dict of its fields (an unknown field is refused, naming the known ones);
    ``defaults`` fill the fields ``given`` leaves out (e.g. ``sdsx.prune``'s ``blocksize``); those
    the options do not have are ignored."""
    if isinstance(given, pruner.options):
        return given
    if given is not None and not isinstance(given, dict):
        raise TypeError(f"options of {pruner.name} must be a {pruner.options.__name__} or a dict, got {type(given).__name__}")
    known = [f.name for f in fields(pruner.options)]
    unknown = sorted(set(given or {}) - set(known))
    if unknown:
        raise ValueError(f"{pruner.name} has no option {unknown[0]!r}; its options: {', '.join(known) or 'none'}")
    values = {k: v for k, v in defaults.items() if k in known}
    values.update(given or {})
    return pruner.options(**values)


def option_help(pruner: Pruner) -> dict[str, str]:
    """One line of help per option, from the options dataclass's docstring lines ``name: text``
    (the field name alone when the docstring does not describe it)."""
    doc = pruner.options.__doc__ or ""
    out = {}
    for f in fields(pruner.options):
        text = next((line.split(":", 1)[1].strip() for line in doc.splitlines() if line.strip().startswith(f"{f.name}:")), f.name)
        out[f.name] = text
    return out
