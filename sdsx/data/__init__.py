"""Calibration windows and evaluation text from local files, iterables of strings or the hub."""

from sdsx.data.calibration import calibration, encode
from sdsx.data.text import HUB_DATASETS, load_text

__all__ = ["HUB_DATASETS", "calibration", "encode", "load_text"]
