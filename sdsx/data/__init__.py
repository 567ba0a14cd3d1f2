"""Calibration windows and evaluation text from local files, iterables of strings or the hub."""

from sdsx.data.calibration import calibration, encode, held_out
from sdsx.data.sources import calibration_from, mixed_calibration, self_calibration
from sdsx.data.text import HUB_DATASETS, load_text

__all__ = ["HUB_DATASETS", "calibration", "calibration_from", "encode", "held_out", "load_text", "mixed_calibration", "self_calibration"]
