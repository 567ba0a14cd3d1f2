"""Does a loss on context-copied tokens see what LAMBADA sees? Prune SmolLM2-135M (or Gemma-3-270M)
with a base pruner and with SDS on the same calibration windows, then score each model on the
calibration text's held-out tail: the mean next-token loss over every token, and over the
"copied" tokens only (targets that already occurred earlier in the window and are not among the
text's most frequent tokens: names and content words repeated from context, LAMBADA's kind).

    python bench/copy_loss.py [--model smollm2-135m] [--pattern 2:4] [--pruner sparsegpt] [--seed 0]
                              [--windows 32] [--json bench/results/sds26/copy_loss.json]

Nothing here is a default of sdsx: a diagnostic for the guard (docs/sds.md, "Which part of SDS
costs LAMBADA").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

import sdsx
from sdsx.data import held_out
from sdsx.data.paths import data_root
from sdsx.job import load_model


def copied_positions(windows: torch.Tensor, frequent: set[int]) -> torch.Tensor:
    """(n, L-1) bool: target token i+1 occurred in the window before it and is not frequent."""
    n, length = windows.shape
    mask = torch.zeros(n, length - 1, dtype=torch.bool)
    for row in range(n):
        seen: set[int] = set()
        ids = windows[row].tolist()
        for i in range(length - 1):
            seen.add(ids[i])
            target = ids[i + 1]
            mask[row, i] = target in seen and target not in frequent
    return mask


@torch.no_grad()
def losses(model, windows: torch.Tensor, copied: torch.Tensor) -> dict[str, float]:
    all_nll, copy_nll, count = 0.0, 0.0, 0
    model.eval()
    for row in range(windows.shape[0]):
        ids = windows[row : row + 1]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        all_nll += float(nll.sum())
        copy_nll += float(nll[copied[row]].sum())
        count += int(copied[row].sum())
    total = windows.shape[0] * (windows.shape[1] - 1)
    return {"all": all_nll / total, "copied": copy_nll / max(count, 1), "copied_tokens": count}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--pruner", default="sparsegpt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=32, help="validation windows of 512 tokens from the tail")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    text = data_root() / "calib" / "sotu_1990_2021.txt"
    model, tok, _, _ = load_model(args.model)
    calib = sdsx.calibration(str(text), tok, nsamples=32, seqlen=512, seed=args.seed, holdout=0.15)
    tail = held_out(str(text), tok, 0.15)
    windows = tail[: (tail.numel() // 512) * 512].reshape(-1, 512)[: args.windows]
    counts = torch.bincount(tail.flatten())
    frequent = set(torch.topk(counts, 100).indices.tolist())
    copied = copied_positions(windows, frequent)
    out = {"model": args.model, "pattern": args.pattern, "pruner": args.pruner, "seed": args.seed,
           "windows": int(windows.shape[0]), "copied_tokens": int(copied.sum())}
    out["dense"] = losses(model, windows, copied)
    base = copy.deepcopy(model)
    sdsx.prune(base, calib, args.pruner, args.pattern, progress=False)
    out["base"] = losses(base, windows, copied)
    del base
    sds = copy.deepcopy(model)
    sdsx.sds_prune(sds, calib, args.pattern, args.pruner, progress=False)
    out["sds"] = losses(sds, windows, copied)
    for k in ("all", "copied"):
        out[f"sds_vs_base_{k}"] = math.exp(out["sds"][k] - out["base"][k]) - 1
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
