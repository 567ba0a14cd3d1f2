"""Kernel benchmark: every sdsx op against its pure-PyTorch reference, side by side in one process.

    python bench/kernels.py [--threads 1] [--shapes smollm2,opt125m,llama7b] [--json PATH] [--md PATH]
    python bench/kernels.py --device cuda [--compile] --json PATH      # on a GPU: the CUDA kernels

Per op and weight shape (out x in) it reports the reference's and our median time, the speedup,
whether the masks are identical, and for the OBS sweep its GFLOP/s next to a plain GEMM of the
same size (W @ U, measured in the same run), which is the speed limit of the lazy block update;
and the statistics' upper-triangle Gram update against the row-blocked GEMMs of its reference (CPU
only: on a GPU the reference's GEMMs are what runs). With --compile the elementwise and mask ops are
also timed as torch.compile of their reference (the sweep's column loop is not worth compiling).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import sdsx
from sdsx import ops
from sdsx.ops import reference as ref
from sdsx.pruners import inverse_hessian_factor

SHAPES = {
    "smollm2": [(576, 576), (1536, 576), (576, 1536)],
    "opt125m": [(768, 768), (3072, 768), (768, 3072)],
    "llama7b": [(4096, 4096)],
}


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, repeats: int, warmup: int = 1) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def problem(rows: int, cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(max(2 * cols, 1024), cols, generator=g) * torch.rand(cols, generator=g).add(0.1)
    H = X.t() @ X / X.shape[0]
    U, _, _ = inverse_hessian_factor(H, 0.01)
    return W.to(DEVICE), U.to(DEVICE)


def bench_shape(rows: int, cols: int, repeats: int, ref_repeats: int, compiled: bool = False) -> list[dict]:
    W, U = problem(rows, cols)
    out = []
    sweep_flops = rows * cols * cols  # r*c^2/2 multiply-adds of the compensation updates
    gemm_ms, _ = timeit(lambda: W @ U, repeats)
    gemm_gflops = 2 * rows * cols * cols / gemm_ms / 1e6
    for label, (s, n, m) in {"obs_sweep 50%": (0.5, 0, 0), "obs_sweep 2:4": (0.0, 2, 4)}.items():
        ref_ms, r = timeit(lambda: ref.obs_sweep(W, U, s, n, m, 128), ref_repeats, warmup=0)
        ext_ms, e = timeit(lambda: ops.obs_sweep(W, U, s, n, m, 128), repeats)
        out.append(
            dict(
                op=label, shape=f"{rows}x{cols}", ref_ms=ref_ms, ext_ms=ext_ms, speedup=ref_ms / ext_ms,
                identical_masks=bool(torch.equal(r[1], e[1])),
                mask_agreement=float((r[1] == e[1]).float().mean()),
                max_weight_diff=float((r[0] - e[0]).abs().max()),
                sweep_gflops=sweep_flops / ext_ms / 1e6, ref_sweep_gflops=sweep_flops / ref_ms / 1e6,
                gemm_ms=gemm_ms, gemm_gflops=gemm_gflops,
            )
        )
    scores = W.abs()
    cases = {
        "nm_mask 2:4": (lambda: ref.nm_mask(scores, 2, 4), lambda: ops.nm_mask(scores, 2, 4)),
        "topk_mask row 50%": (lambda: ref.topk_mask(scores, 0.5, True), lambda: ops.topk_mask(scores, 0.5, True)),
        "topk_mask matrix 50%": (lambda: ref.topk_mask(scores, 0.5, False), lambda: ops.topk_mask(scores, 0.5, False)),
    }
    Y, Wp, G = W, W * 0.9, W * 0.1
    mask = scores > 0.5
    cases["prox_step l1"] = (
        lambda: ref.prox_step(Y, Wp, G, 0.1, 0.1, 0.1, 0.5, None)[0],
        lambda: ops.prox_step(Y, Wp, G, 0.1, 0.1, 0.1, 0.5, None)[0],
    )
    cases["prox_step mask"] = (
        lambda: ref.prox_step(Y, Wp, G, 0.1, 0.1, 0.1, 0.5, mask)[0],
        lambda: ops.prox_step(Y, Wp, G, 0.1, 0.1, 0.1, 0.5, mask)[0],
    )
    for label, (fr, fe) in cases.items():
        ref_ms, r = timeit(fr, repeats)
        ext_ms, e = timeit(fe, repeats)
        same = bool(torch.equal(r, e)) if r.dtype == torch.bool else bool(torch.allclose(r, e, atol=1e-6))
        row = dict(op=label, shape=f"{rows}x{cols}", ref_ms=ref_ms, ext_ms=ext_ms, speedup=ref_ms / ext_ms, identical_masks=same)
        if compiled:
            fc = torch.compile(fr)
            t0 = time.perf_counter()
            fc()
            row["compile_s"] = time.perf_counter() - t0
            row["ref_compiled_ms"], _ = timeit(fc, repeats)
        out.append(row)
    return out


def bench_gram(cols: int, repeats: int, tokens: int = 4096) -> dict:
    """The statistics' update C += X^T X (upper triangle) for one 4096-token chunk: the reference's
    row-blocked GEMMs against the native kernel, with the full GEMM as the yardstick."""
    g = torch.Generator().manual_seed(cols)
    X = torch.randn(tokens, cols, generator=g)
    C_ref, C_ext, C_full = (torch.zeros(cols, cols) for _ in range(3))
    fns = dict(
        ref=lambda: ref.gram_upper_(C_ref.zero_(), X),
        ext=lambda: ops.gram_upper_(C_ext.zero_(), X),
        gemm=lambda: C_full.zero_().addmm_(X.t(), X),
    )
    # interleaved repeats: this machine's speed drifts within seconds, and three back-to-back
    # blocks of repeats would each see a different machine
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    ref_ms, ext_ms, gemm_ms = (statistics.median(times[k]) for k in ("ref", "ext", "gemm"))
    same = bool(torch.allclose(C_ref.triu(), C_ext.triu(), rtol=1e-4, atol=1e-3))
    useful = tokens * cols * (cols + 1)  # flops of the upper triangle (multiply-adds x 2)
    return dict(op="gram_upper_", shape=f"{tokens}x{cols} (tokens x in)", ref_ms=ref_ms, ext_ms=ext_ms, speedup=ref_ms / ext_ms,
                identical_masks=same, sweep_gflops=useful / ext_ms / 1e6, gemm_ms=gemm_ms,
                gemm_gflops=2 * tokens * cols * cols / gemm_ms / 1e6)


def bench_sq_colsum(cols: int, repeats: int, tokens: int = 512) -> dict:
    """Wanda's statistics update acc += (X * X).sum(0) for one 512-token window (what a block's
    hook sees per calibration sequence): the reference expression against the native kernel,
    interleaved like bench_gram."""
    g = torch.Generator().manual_seed(cols)
    X = torch.randn(tokens, cols, generator=g)
    a_ref, a_ext = torch.zeros(cols), torch.zeros(cols)
    fns = dict(ref=lambda: ref.sq_colsum_(a_ref, X), ext=lambda: ops.sq_colsum_(a_ext, X))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(10 * repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    ref_ms, ext_ms = (statistics.median(times[k]) for k in ("ref", "ext"))
    same = bool(torch.allclose(a_ref, a_ext, rtol=1e-5))
    return dict(op="sq_colsum_", shape=f"{tokens}x{cols} (tokens x in)", ref_ms=ref_ms, ext_ms=ext_ms,
                speedup=ref_ms / ext_ms, identical_masks=same)


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Kernel benchmark: {meta['threads']} thread(s), torch {meta['torch']}, {meta['machine']}; "
        "median ms; identical = same mask (bool ops) / same values within 1e-6 (prox_step) / same upper "
        "triangle within 1e-4 relative (gram_upper_) / same sums within 1e-5 relative (sq_colsum_). GFLOP/s: the OBS sweep's r*c^2 flops, or the "
        "upper triangle's useful flops for gram_upper_; GEMM: a full GEMM of the same size, same run.",
        "",
        "| op | shape (out x in) | reference ms | compiled reference ms | sdsx ms | speedup | identical | sweep GFLOP/s | GEMM GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        gf = f"{r['sweep_gflops']:.1f}" if "sweep_gflops" in r else ""
        gg = f"{r['gemm_gflops']:.1f}" if "gemm_gflops" in r else ""
        rc = f"{r['ref_compiled_ms']:.2f}" if "ref_compiled_ms" in r else ""
        same = "yes" if r["identical_masks"] else f"NO ({r['mask_agreement']:.4f})" if "mask_agreement" in r else "NO"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['ref_ms']:.2f} | {rc} | {r['ext_ms']:.2f} | {r['speedup']:.2f}x | "
            f"{same} | {gf} | {gg} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", default="smollm2,opt125m,llama7b", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the tensors live (cuda: the CUDA kernels)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the mask and prox_step references")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--md", type=Path, default=None, help="write the markdown table here")
    args = p.parse_args(argv)

    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    info = sdsx.backend_info()
    if not info["extension_loaded"]:
        print(f"error: the sdsx extension is not loaded ({info['extension_error']}); nothing to compare", file=sys.stderr)
        return 2
    if DEVICE.type == "cuda" and (not torch.cuda.is_available() or info["missing_cuda_kernels"]):
        print(f"error: --device cuda needs a GPU and the CUDA kernels (missing: {info['missing_cuda_kernels']})", file=sys.stderr)
        return 2
    machine = torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.machine()
    meta = dict(threads=args.threads, device=args.device, torch=torch.__version__, machine=machine, backend=info)
    results = []
    for group in args.shapes.split(","):
        if group not in SHAPES:
            p.error(f"unknown shape set {group!r}; choose from {sorted(SHAPES)}")
        for rows, cols in SHAPES[group]:
            big = rows * cols > 4_000_000
            res = bench_shape(rows, cols, repeats=1 if big else args.repeats, ref_repeats=1 if big else max(1, args.repeats // 2),
                              compiled=args.compile)
            for r in res:
                r["set"] = group
                print(f"{r['op']:>22} {r['shape']:>10}: ref {r['ref_ms']:9.2f} ms  sdsx {r['ext_ms']:9.2f} ms  {r['speedup']:6.2f}x", flush=True)
            results.extend(res)
        for cols in sorted({c for _, c in SHAPES[group]}) if DEVICE.type == "cpu" else ():
            for r in (bench_gram(cols, repeats=args.repeats), bench_sq_colsum(cols, repeats=args.repeats)):
                r["set"] = group
                print(f"{r['op']:>22} {cols:>10}: ref {r['ref_ms']:9.2f} ms  sdsx {r['ext_ms']:9.2f} ms  {r['speedup']:6.2f}x", flush=True)
                results.append(r)
    md = to_markdown(results, meta)
    print()
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    # On a GPU the sweep's lazy GEMM rounds unlike the reference's: a near-tie may flip.
    bad = [r for r in results if not r["identical_masks"] and not (DEVICE.type == "cuda" and r.get("mask_agreement", 0) >= 0.99)]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
