"""Which CG refit iterate is best on the validation windows? (the measurement behind scoring only
the start and the end in :func:`sdsx.pruners.sds.refit`)

    python bench/refit_iterates.py --pruner wanda --pattern 2:4 --json bench/results/sds13/refit_iterates_wanda_24.json

Runs the default SDS on SmolLM2-135M with the calibration of bench/sds.py (32 x 512 from the first
85% of the speeches, the given seed) and, for every layer's refit, recomputes every CG iterate
(CG is deterministic: ``refit(..., iters=k)`` is iterate k) and its error on the layer's
validation Gram. Reports how many layers had an intermediate iterate better than both the start
and the last, and what choosing between start and last only loses in validation error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sdsx
import sdsx.pruners.sds as sds_mod
from sdsx.model.smollm2 import load_smollm2
from sdsx.pruners.base import reconstruction_error

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pruner", default="wanda")
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--calib", default=str(DATA / "calib" / "sotu_1990_2021.txt"))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--holdout", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    # bench/sds.py's windows: one token stream, no BOS per window
    calib = sdsx.calibration(args.calib, tok, args.nsamples, args.seqlen, args.seed, bos="never", holdout=args.holdout)

    real = sds_mod.refit
    curves: list[list[float]] = []

    def recording(W_start, W_d, H, mask, iters, shift=None, H_val=None, history=None):
        out = real(W_start, W_d, H, mask, iters, shift, H_val, history)
        if H_val is not None:
            curves.append([reconstruction_error(W_d, real(W_start, W_d, H, mask, k, shift), H_val) for k in range(iters + 1)])
        return out

    sds_mod.refit = recording
    try:
        sdsx.sds_prune(model, calib, args.pattern, args.pruner, progress=False)
    finally:
        sds_mod.refit = real
    if not curves:
        raise SystemExit("no refit ran with validation windows: nothing measured")
    lost = [min(c[0], c[-1]) / min(c) - 1.0 for c in curves]
    summary = dict(
        pruner=args.pruner, pattern=args.pattern, seed=args.seed, layers=len(curves),
        intermediate_best=sum(1 for c in curves if min(c) < min(c[0], c[-1])),
        last_beats_start=sum(1 for c in curves if c[-1] <= c[0]),
        max_relative_loss=max(lost), mean_relative_loss=sum(lost) / len(lost),
    )
    print(json.dumps(summary))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(summary=summary, curves=curves)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
