"""Where the offline data lives: one rule for the CLI's defaults and the zero-shot task files."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "data_root"]


def data_root() -> Path | None:
    """$SDSX_DATA when set, else ``../shared/data`` next to the checkout when it exists, else None.

    The data is never vendored: code takes paths, and this is only the default when none is given.
    """
    env = os.environ.get("SDSX_DATA")
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return here if here.is_dir() else None


def cache_root() -> Path:
    """Where sdsx caches what it derives (the converted SmolLM2, self-generated calibration):
    $SDSX_CACHE when set, else ~/.cache/sdsx."""
    env = os.environ.get("SDSX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sdsx"
