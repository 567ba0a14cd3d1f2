"""Plots of bench/sds.py results: the error over depth (validation hidden-state deviation from the
dense model after every block) of each method, and SDS's per-layer mask agreement with phase 1.

    python bench/sds_plots.py bench/results/sds13/s0_sparsegpt_24.json [more.json ...] --out bench/results/sds13/depth.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def depth_curve(row: dict) -> list[float]:
    """The deviation after each block for the weights the run kept (after the block fit, if any)."""
    blocks = sorted(row.get("blocks") or [], key=lambda b: b["block"])
    return [b["deviation"].get("fit", b["deviation"][b["chosen"]]) for b in blocks]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for path in args.results:
        data = json.loads(path.read_text())
        seed = data["meta"].get("seed", 0)
        for row in data["rows"]:
            curve = depth_curve(row)
            if not curve:
                continue
            label = f"{row['method']} {row['pattern']} (seed {seed}, WikiText-2 {row['ppl']:.1f})"
            ax1.plot(range(len(curve)), curve, marker=".", label=label)
            errs = row.get("phase_errors") or {}
            agree = [e["mask_agreement"] for e in errs.values() if "mask_agreement" in e]
            if agree:
                ax2.plot(range(len(agree)), [100 * a for a in agree], ".", label=label)
    ax1.set_xlabel("block")
    ax1.set_ylabel("validation deviation from the dense hidden state")
    ax1.set_yscale("log")
    ax1.set_title("error over depth")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("linear layer (in model order)")
    ax2.set_ylabel("final mask = phase 1 mask, % of positions")
    ax2.set_title("does the mask move?")
    if ax2.has_data():
        ax2.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
