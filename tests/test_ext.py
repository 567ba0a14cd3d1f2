"""The extension loader: a broken install fails loudly, a missing one falls back with a warning, CUDA
tensors never quietly meet a build without CUDA kernels, and the dispatcher is the judge of which
kernels a build registered (asked without a device)."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdsx
from sdsx import _ext

CALL = "import torch, sdsx.ops as o; print(o.nm_mask(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2, 4).tolist())"
KEEP = "[[False, True, True, False]]"  # the two largest of 1, 3, 2, 0


def _package_copy(tmp_path: Path, extension: bytes | None) -> Path:
    """A copy of the sdsx package without its built extension, or with ``extension`` as its file."""
    dst = tmp_path / "site" / "sdsx"
    shutil.copytree(Path(sdsx.__file__).parent, dst, ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    if extension is not None:
        (dst / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(extension)
    return dst.parent


def _run(site: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("SDSX_FORCE_REFERENCE", "SDSX_REQUIRE_EXTENSION")}
    return subprocess.run([sys.executable, "-c", CALL], capture_output=True, text=True, cwd=site,
                          env={**base, "PYTHONPATH": str(site), **env})


def test_broken_extension_is_an_error_not_a_fallback(tmp_path):
    site = _package_copy(tmp_path, b"not a shared library")
    out = _run(site)
    assert out.returncode != 0
    assert "installed but does not load" in out.stderr and "pip install --no-build-isolation" in out.stderr
    forced = _run(site, SDSX_FORCE_REFERENCE="1")  # the documented way to run the references anyway
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() == KEEP


def test_missing_extension_falls_back_with_a_warning(tmp_path):
    site = _package_copy(tmp_path, None)
    out = _run(site)
    assert out.returncode == 0, out.stderr
    assert "native extension not available" in out.stderr
    assert out.stdout.strip() == KEEP
    required = _run(site, SDSX_REQUIRE_EXTENSION="1")
    assert required.returncode != 0 and "SDSX_REQUIRE_EXTENSION is set" in required.stderr


def test_cuda_tensors_on_a_build_without_cuda_kernels(monkeypatch):
    # What a GPU machine with a CPU-only build sees: a warning once, an error when the extension is required.
    monkeypatch.setitem(_ext._state, "loaded", True)
    monkeypatch.setitem(_ext._state, "fatal", None)
    monkeypatch.setitem(_ext._state, "build", {"cuda": False, "openmp": True})
    monkeypatch.setitem(_ext._state, "warned_cuda", False)
    monkeypatch.delenv("SDSX_FORCE_REFERENCE", raising=False)
    monkeypatch.delenv("SDSX_REQUIRE_EXTENSION", raising=False)
    with pytest.warns(RuntimeWarning, match="built without CUDA kernels"):
        assert not _ext.has_kernel("obs_sweep", "cuda")
    assert not _ext.has_kernel("gram_upper_", "cuda")  # CPU-only by design: no warning owed
    monkeypatch.setenv("SDSX_REQUIRE_EXTENSION", "1")
    with pytest.raises(RuntimeError, match="SDSX_CUDA=ON"):
        _ext.has_kernel("nm_mask", "cuda")


def test_dispatcher_agrees_with_the_build():
    info = sdsx.backend_info()
    if not info["extension_loaded"]:
        pytest.skip(f"extension not built: {info['extension_error']}")
    for op in _ext.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sdsx::{op}", "CPU"), op
    # A CUDA build registers every CUDA op (no device needed to ask); a CPU build none.
    want = [] if info["cuda_kernels"] else list(_ext.CUDA_OP_NAMES)
    assert _ext.missing_cuda_kernels() == want
    if not info["cuda_kernels"]:
        assert not any(torch._C._dispatch_has_kernel_for_dispatch_key(f"sdsx::{op}", "CUDA") for op in _ext.OP_NAMES)
