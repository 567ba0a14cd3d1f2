"""A small layer-parallel SDS run for test_parallel.py, launched with torchrun (or plainly, as one
process). Rank 0 writes the final weights of every parameter to --out."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_tiny, tiny_calib  # noqa: E402

import sdsx  # noqa: E402
from sdsx.parallel import init_distributed, install_stop_message  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--sparsity", default="2:4")
    p.add_argument("--pruner", default="sparsegpt")
    p.add_argument("--distributed", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rank = 0
    if args.distributed:
        rank, _ = init_distributed()
        install_stop_message(args.ckpt)
    model = make_tiny("llama", layers=args.layers)
    calib = tiny_calib(nsamples=6, seqlen=24)
    report = sdsx.sds_prune(model, calib, args.sparsity, args.pruner, schedule="parallel", dense_iters=6, adjust_iters=3,
                            progress=False, checkpoint_dir=args.ckpt)
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
        print("PARALLEL", report.parallel)
    else:
        assert report is None


if __name__ == "__main__":
    main()
