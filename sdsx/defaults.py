"""The defaults that the library and the command line share, in one place (docs/defaults.md lists
every default and what chose it).

Calibration: 32 windows of 512 tokens. The paper calibrates on 128 x 2048 tokens of C4; 32 x 512
(16k tokens) is what every SDS default here was chosen with (docs/sds.md), and what a one-core CPU
runs in minutes on SmolLM2-135M. Pass ``nsamples`` and ``seqlen`` for the paper's setting.

Validation: ``"auto"`` holds out 1/8 of the calibration windows (at least 2, and only from 8 windows
up) for the guards and the block fit's choice of iterate (:func:`auto_validation`).
"""

from __future__ import annotations

__all__ = ["CALIB_NSAMPLES", "CALIB_SEQLEN", "auto_validation"]

CALIB_NSAMPLES = 32
CALIB_SEQLEN = 512


def auto_validation(nsamples: int, schedule: str = "interleaved") -> int | None:
    """What ``validation="auto"`` holds out of ``nsamples`` calibration sequences: 1/8 of them (at
    least 2) with the interleaved schedule and at least 8 sequences, else none."""
    return max(2, round(nsamples / 8)) if (schedule == "interleaved" and nsamples >= 8) else None
