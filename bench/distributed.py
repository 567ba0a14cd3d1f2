"""Layer-parallel SDS on 1, 2, 4 ... CPU ranks (torchrun + gloo) on SmolLM2-135M.

For every rank count it runs, in a subprocess and one after another,

    torchrun --nproc-per-node N -m sdsx prune smollm2-135m --method sds --distributed --out DIR ...

and reads DIR/sdsx.json: the driver's phase-1 time, per rank the layers of phases 2/3 it did, its
busy and idle seconds, the perplexity, and the saved weights (compared with the 1-rank run's).

Output: JSON + markdown. On this 2-core machine more than 2 ranks share cores, so the wall times
show the protocol's overhead and balance rather than a speed-up; the per-rank busy time and layer
counts are the work balance.

    python bench/distributed.py --ranks 1,2,4 --max-windows 32 \
        --json bench/results/distributed.json --md bench/results/distributed.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "calib" / "sotu_1990_2021.txt"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(ranks: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
        "--master-port", str(_port()), "-m", "sdsx", "prune", args.model, "--method", "sds", "--pruner", args.pruner,
        "--sparsity", args.sparsity, "--distributed", "--out", str(out), "--overwrite", "--calib", str(args.calib),
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--ppl", str(args.wikitext),
        "--ppl-seqlen", str(args.ppl_seqlen), "--max-windows", str(args.max_windows), "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks} ranks failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    meta = json.loads((out / "sdsx.json").read_text())
    rep = meta["report"]
    par = rep["parallel"]
    workers = [r for r in par["ranks"] if r["layers"]]
    busy = [r["busy_s"] for r in workers]
    return {
        "ranks": ranks,
        "command": " ".join(cmd[2:]),
        "wall_s": wall,
        "prune_s": rep["total_s"],
        "phase1_forward_s": rep["forward_s"],
        "phase1_stats_s": rep["stats_s"],
        "driver_solver_s": rep["solver_s"],
        "phase23_busy_sum_s": sum(busy),
        "phase23_busy_max_s": max(busy) if busy else 0.0,
        "phase23_span_s": par["phase23_wall_s"],
        "balance": (max(busy) / (sum(busy) / len(busy))) if busy else None,
        "per_rank": par["ranks"],
        "ppl": meta["meta"]["pruned"].get("ppl"),
        "sparsity": meta["overall_sparsity"],
    }


def compare_weights(a: Path, b: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    wa = {}
    for f in sorted(a.glob("*.safetensors")):
        wa.update(load_file(str(f)))
    wb = {}
    for f in sorted(b.glob("*.safetensors")):
        wb.update(load_file(str(f)))
    if wa.keys() != wb.keys():
        return {"identical": False, "max_abs_diff": float("nan")}
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) if wa[k].numel() else 0.0 for k in wa)
    return {"identical": all(torch.equal(wa[k], wb[k]) for k in wa), "max_abs_diff": diff}


def tail_costs(opts_kwargs: dict[str, Any] | None = None, tokens: int = 4096, repeats: int = 2) -> list[dict[str, Any]]:
    """Seconds of phase 1 (SparseGPT 2:4) and of phases 2/3 (sds_tail) for one layer of each of
    SmolLM2-135M's shapes, on random weights and inputs, in this process (1 thread): the measured
    per-layer costs the 70B plan in docs/distributed.md extrapolates from (by r*c^2 and c^3)."""
    from sdsx.pruners.sds import LayerCall, SDSOptions, SharedH, prune_once, sds_tail
    from sdsx.pruners.spec import SparsitySpec

    torch.set_num_threads(1)
    spec = SparsitySpec.parse("2:4")
    opts = SDSOptions(**(opts_kwargs or {}))
    rows = []
    for name, (r, c) in {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate_proj/up_proj": (1536, 576),
                         "down_proj": (576, 1536)}.items():
        g = torch.Generator().manual_seed(r * c)
        X = torch.randn(tokens, c, generator=g)
        H = X.t() @ X / tokens
        W = torch.randn(r, c, generator=g) / c**0.5
        best1 = best23 = bare = float("inf")
        for _ in range(repeats):
            sh = SharedH(opts)(H)
            t0 = time.perf_counter()
            s1 = prune_once("sparsegpt", W, H, spec, opts, name, sh.factor)
            t1 = time.perf_counter()
            sds_tail(W, s1, H, spec, opts, LayerCall(name, shared=SharedH(opts)))
            t2 = time.perf_counter()
            for _ in range(30):  # the bare GEMMs of phases 2/3, side by side: the overhead factor
                W @ H
            t3 = time.perf_counter()
            best1, best23, bare = min(best1, t1 - t0), min(best23, t2 - t1), min(bare, t3 - t2)
        rows.append({"layer": name, "rows": r, "cols": c, "phase1_s": best1, "phase23_s": best23, "gemm30_s": bare,
                     "overhead": best23 / bare, "gemm_flops_per_iter": 2.0 * r * c * c})
    return rows


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"Layer-parallel SDS-{record['pruner']} {record['sparsity']} on {record['model']}, calibration {record['nsamples']} x "
        f"{record['seqlen']} tokens, perplexity over {record['max_windows']} windows of {record['ppl_seqlen']}; torchrun + gloo, "
        f"1 thread per rank, {os.cpu_count()} cores. Phase 1 runs on rank 0; phases 2/3 inline with 1 rank, on ranks 1..N-1 "
        "otherwise.",
        "",
        "| ranks | wall s | SDS run s | phase-2/3 busy, sum s | phase-2/3 busy, slowest rank s | phase-2/3 span s | balance (max/mean) | layers per rank | ppl | same weights as 1 rank |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in record["runs"]:
        layers = ", ".join(f"{x['rank']}:{x['layers']}" for x in r["per_rank"])
        same = r.get("vs_1rank", {})
        same_txt = "-" if not same else ("bit-identical" if same["identical"] else f"max diff {same['max_abs_diff']:.2e}")
        bal = f"{r['balance']:.3f}" if r["balance"] else "-"
        ppl = f"{r['ppl']:.3f}" if r["ppl"] is not None else "-"
        lines.append(
            f"| {r['ranks']} | {r['wall_s']:.1f} | {r['prune_s']:.1f} | {r['phase23_busy_sum_s']:.1f} | {r['phase23_busy_max_s']:.1f} | "
            f"{r['phase23_span_s']:.1f} | {bal} | {layers} | {ppl} | {same_txt} |"
        )
    if record.get("layer_costs"):
        lines += ["", "Per-layer cost on this CPU (1 thread, random weights, SmolLM2 shapes; phase 1 is SparseGPT's "
                  "sweep without statistics, phases 2/3 are re-dense 20 + SparseGPT + adjust 10):", "",
                  "| layer | shape | phase 1 s | phases 2/3 s | 30 bare GEMMs s | overhead | GEMM GFLOP/s |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for c in record["layer_costs"]:
            rate = 30 * c["gemm_flops_per_iter"] / c["gemm30_s"] / 1e9
            lines.append(f"| {c['layer']} | {c['rows']} x {c['cols']} | {c['phase1_s']:.3f} | {c['phase23_s']:.3f} | "
                         f"{c['gemm30_s']:.3f} | {c['overhead']:.2f}x | {rate:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts (default 1,2,4)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pruner", default="sparsegpt", choices=("sparsegpt", "wanda"))
    p.add_argument("--sparsity", default="2:4")
    p.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    p.add_argument("--wikitext", type=Path, default=DEFAULT_WIKITEXT)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ppl-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=32)
    p.add_argument("--no-layer-costs", action="store_true", help="skip the per-layer cost measurement")
    p.add_argument("--layer-costs-only", action="store_true", help="only the per-layer costs (no torchrun runs)")
    p.add_argument("--workdir", type=Path, default=None, help="where the runs' folders go (default a temporary folder, removed)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    args = p.parse_args(argv)
    ranks = [int(x) for x in args.ranks.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sdsx-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("json", "md", "workdir", "no_layer_costs", "layer_costs_only")}
    record["runs"] = []
    if args.layer_costs_only:
        ranks = []
    try:
        for n in ranks:
            out = work / f"ranks-{n}"
            r = run_one(n, out, args)
            if n != ranks[0]:
                r["vs_1rank"] = compare_weights(work / f"ranks-{ranks[0]}", out)
            record["runs"].append(r)
            print(f"{n} ranks: wall {r['wall_s']:.1f}s, phase-2/3 busy max {r['phase23_busy_max_s']:.1f}s, ppl {r['ppl']}", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if not args.no_layer_costs:
        record["layer_costs"] = tail_costs()
    md = markdown(record)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    return record


if __name__ == "__main__":
    main()
