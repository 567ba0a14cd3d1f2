"""Loading of the native extension (sdsx._C) and the choice between it and the references.

Environment:
  SDSX_FORCE_REFERENCE=1   run the pure-PyTorch references even when the extension is present.
  SDSX_REQUIRE_EXTENSION=1 make a missing extension an error instead of a warning (CI sets it).
"""

from __future__ import annotations

import os
import warnings

OP_NAMES = ("nm_mask", "topk_mask", "obs_sweep", "prox_step", "gram_upper_")
_state: dict = {"loaded": None, "error": None, "build": {}}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def load() -> bool:
    """Import sdsx._C once; return whether its ops are registered."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    try:
        import torch  # noqa: F401  (loads libtorch before our library needs its symbols)

        from sdsx import _C  # type: ignore[attr-defined]

        _state["build"] = dict(_C.build_info())
        _state["loaded"] = True
        from sdsx.ops import fake

        fake.register()
    except (ImportError, OSError) as exc:  # missing or ABI-mismatched build
        _state["loaded"] = False
        _state["error"] = f"{type(exc).__name__}: {exc}"
        if _truthy("SDSX_REQUIRE_EXTENSION"):
            raise ImportError(
                f"sdsx: the native extension sdsx._C did not load ({_state['error']}) and "
                "SDSX_REQUIRE_EXTENSION is set. Rebuild with `pip install --no-build-isolation .`."
            ) from exc
        warnings.warn(
            f"sdsx: native extension not available ({_state['error']}); running the slow "
            "pure-PyTorch reference implementations. Build it with `pip install --no-build-isolation .` "
            "(after installing torch) to get the native kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _state["loaded"]


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
        return bool(_state["build"].get("cuda"))
    return False


def backend_info() -> dict:
    """What is running: extension loaded (and why not), CUDA kernels, OpenMP, threads, torch version."""
    import torch

    loaded = load()
    return {
        "extension_loaded": loaded,
        "extension_error": _state["error"],
        "forced_reference": _truthy("SDSX_FORCE_REFERENCE"),
        "cuda_kernels": bool(_state["build"].get("cuda", False)),
        "cuda_available": torch.cuda.is_available(),
        "openmp": bool(_state["build"].get("openmp", False)),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ops": [op for op in OP_NAMES if loaded and hasattr(torch.ops.sdsx, op)],
    }
