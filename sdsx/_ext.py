"""Loading of the native extension (sdsx._C) and the choice between it and the references.

An extension that is not there (a source checkout, a pure-Python install) means the references run,
with one warning. An extension that is there but does not load (built against another torch or
CUDA) is an error: running the slow references in its place would hide a broken install.

Environment:
  SDSX_FORCE_REFERENCE=1   run the pure-PyTorch references even when the extension is present.
  SDSX_REQUIRE_EXTENSION=1 make a missing extension an error instead of a warning (CI sets it), and
                           CUDA tensors reaching an extension built without CUDA kernels too.
"""

from __future__ import annotations

import os
import warnings

OP_NAMES = ("nm_mask", "topk_mask", "obs_sweep", "prox_step", "gram_upper_", "sq_colsum_")
# The ops with a CUDA kernel in a CUDA build (gram_upper_ and sq_colsum_ are CPU only: on a GPU the
# library GEMM and reduction are it).
CUDA_OP_NAMES = ("nm_mask", "topk_mask", "obs_sweep", "prox_step")
_REBUILD = "Rebuild it against the torch you run: `pip install --no-build-isolation .` (see the README's Install)."
_state: dict = {"loaded": None, "error": None, "fatal": None, "build": {}, "warned_cuda": False}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def load() -> bool:
    """Import sdsx._C once; return whether its ops are registered. Raises ImportError when the
    extension is installed but does not load (or is missing and SDSX_REQUIRE_EXTENSION is set),
    unless SDSX_FORCE_REFERENCE is set."""
    if _state["loaded"] is None:
        _state["loaded"] = _import()
    if _state["fatal"] and not _truthy("SDSX_FORCE_REFERENCE"):
        raise ImportError(_state["fatal"])
    return _state["loaded"]


def _import() -> bool:
    import importlib.util

    import torch  # noqa: F401  (loads libtorch before our library needs its symbols)

    present = importlib.util.find_spec("sdsx._C") is not None
    try:
        from sdsx import _C  # type: ignore[attr-defined]

        _state["build"] = dict(_C.build_info())
        from sdsx.ops import fake

        fake.register()
        return True
    except (ImportError, OSError) as exc:  # missing, or built against another torch / CUDA
        _state["error"] = f"{type(exc).__name__}: {exc}"
    if present:
        _state["fatal"] = (
            f"sdsx: the native extension {_C_path()} is installed but does not load ({_state['error']}). "
            f"{_REBUILD} Set SDSX_FORCE_REFERENCE=1 to run the slow pure-PyTorch references instead."
        )
    elif _truthy("SDSX_REQUIRE_EXTENSION"):
        _state["fatal"] = (
            f"sdsx: the native extension sdsx._C is not installed ({_state['error']}) and "
            f"SDSX_REQUIRE_EXTENSION is set. {_REBUILD}"
        )
    elif not _truthy("SDSX_FORCE_REFERENCE"):
        warnings.warn(
            f"sdsx: native extension not available ({_state['error']}); running the slow "
            "pure-PyTorch reference implementations. Build it with `pip install --no-build-isolation .` "
            "(after installing torch) to get the native kernels.",
            RuntimeWarning,
            stacklevel=4,
        )
    return False


def _C_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("sdsx._C")
    return spec.origin if spec is not None and spec.origin else "sdsx._C"


def missing_cuda_kernels() -> list[str]:
    """The ops of :data:`CUDA_OP_NAMES` that have no CUDA kernel registered (all of them when the
    extension did not load). Asks the dispatcher, so it needs no GPU."""
    import torch

    if not load():
        return list(CUDA_OP_NAMES)
    missing = []
    for op in CUDA_OP_NAMES:
        try:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"sdsx::{op}", "CUDA")
        except RuntimeError:  # the op itself is not registered
            has = False
        if not has:
            missing.append(op)
    return missing


def use_extension() -> bool:
    """Whether op wrappers should dispatch to torch.ops.sdsx (extension loaded and not forced off)."""
    return not _truthy("SDSX_FORCE_REFERENCE") and load()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded extension has a kernel for `op` on `device_type` ('cpu' or 'cuda')."""
    if not use_extension():
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        if _state["build"].get("cuda"):
            return op in CUDA_OP_NAMES
        if op in CUDA_OP_NAMES:
            _warn_no_cuda(op)
    return False


def _warn_no_cuda(op: str) -> None:
    msg = (f"sdsx: the extension {_C_path()} was built without CUDA kernels, so {op} on a CUDA tensor runs the "
           "pure-PyTorch reference. Rebuild with a CUDA toolkit: `SDSX_CUDA=ON pip install --no-build-isolation .`.")
    if _truthy("SDSX_REQUIRE_EXTENSION"):
        raise RuntimeError(msg + " (SDSX_REQUIRE_EXTENSION is set)")
    if not _state["warned_cuda"]:
        _state["warned_cuda"] = True
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def backend_info() -> dict:
    """What is running: extension loaded (and why not), CUDA kernels, OpenMP, threads, torch version."""
    import torch

    try:
        loaded = load()
    except ImportError:  # a broken install: say so here instead of raising (the error says why)
        loaded = False
    return {
        "extension_loaded": loaded,
        "extension_error": _state["error"],
        "forced_reference": _truthy("SDSX_FORCE_REFERENCE"),
        "cuda_kernels": bool(_state["build"].get("cuda", False)),
        "missing_cuda_kernels": missing_cuda_kernels() if _state["build"].get("cuda") else list(CUDA_OP_NAMES),
        "cuda_available": torch.cuda.is_available(),
        "openmp": bool(_state["build"].get("openmp", False)),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ops": [op for op in OP_NAMES if loaded and hasattr(torch.ops.sdsx, op)],
    }
