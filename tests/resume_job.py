"""A small checkpointed pruning run, executed as a subprocess by test_checkpoint.py (which kills
it at chosen points and resumes it). Writes the final weights of every parameter to --out."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_tiny, tiny_calib  # noqa: E402

import sdsx  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=["sparsegpt", "sds", "sdsval", "phased", "wanda", "fit"], required=True)
    p.add_argument("--ckpt")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sparsity", default="2:4")
    p.add_argument("--activations", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    model = make_tiny("llama", layers=args.layers).to(getattr(torch, args.dtype))
    calib = tiny_calib(nsamples=6, seqlen=24)
    acts = {"auto": None, "yes": True, "no": False}[args.activations]
    common = dict(progress=False, checkpoint_dir=args.ckpt, save_activations=acts)
    if args.kind in ("sparsegpt", "wanda"):
        sdsx.prune(model, calib, args.kind, args.sparsity, **common)
    elif args.kind == "fit":
        # the block fit: validation windows and the dense stream of the calibration windows travel with the checkpoint
        sdsx.prune(model, calib, "sparsegpt", args.sparsity, validation=2, block_fit=dict(lr=1e-3, epochs=0.75, eval_every=2), **common)  # a part of the windows: a partial dense stream
    else:
        schedule = "phased" if args.kind == "phased" else "interleaved"
        # "sdsval": validation windows, whose two hidden-state streams travel with the checkpoint
        validation = 2 if args.kind == "sdsval" else None
        sdsx.sds_prune(model, calib, args.sparsity, "sparsegpt", schedule=schedule, dense_iters=6, adjust_iters=3,
                       validation=validation, **common)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)


if __name__ == "__main__":
    main()
