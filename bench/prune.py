"""Whole-model pruning of SmolLM2-135M: sdsx against the pure-PyTorch reference pipeline, and
perplexity of dense and every method x pattern on WikiText-2.

Both pipelines use the same block-sequential driver, calibration and thread count, run side by
side in this one process. The reference pipeline is the published SparseGPT/Wanda procedure:
statistics accumulated per linear layer as their code does (a running mean rescaled every batch,
q/k/v and gate/up each computing their own), a factorization per layer, and the pure-PyTorch ops
(``SDSX_FORCE_REFERENCE=1``). Neither pipeline computes the optional per-layer error report.

    python bench/prune.py --json bench/results/prune.json

Time is split into forward passes (the same work for both), statistics and solver; "pruning" is
statistics + solver, the time outside the model's forward passes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "calib" / "sotu_1990_2021.txt"
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("0.5", "2:4", "4:8")


# ------------------------------------------------------------------------- the reference pipeline
class PublishedAccumulator:
    """Layer statistics exactly as the published code accumulates them.

    SparseGPT (``add_batch``): ``H *= n / (n + b); n += b; H += (sqrt(2 / n) X)(sqrt(2 / n) X)^T``
    with n counted in sequences. Wanda: ``scaler_row *= n / (n + b); n += b;
    scaler_row += ||X_j||^2 / n``. ``finalize`` rescales to sdsx's H = X X^T / T, so that both
    pipelines hand the solver the same matrix up to rounding.
    """

    def __init__(self, columns: int, device: torch.device, diag_only: bool) -> None:
        self.diag_only = diag_only
        shape = (columns,) if diag_only else (columns, columns)
        self.H = torch.zeros(shape, dtype=torch.float32, device=device)
        self.nsamples = 0
        self.tokens = 0

    def update(self, inp: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.tokens += inp.shape[1]
        if self.diag_only:
            self.H += torch.norm(inp.float(), p=2, dim=1) ** 2 / self.nsamples
        else:
            inp = math.sqrt(2 / self.nsamples) * inp.float()
            self.H += inp.matmul(inp.t())

    def finalize(self) -> torch.Tensor:
        scale = self.nsamples / self.tokens
        return self.H * (scale if self.diag_only else scale / 2)


def reference_layer_fn(method: str, spec: Any, blocksize: int, percdamp: float):
    """The published per-layer procedure on the pure-PyTorch ops (forced by the caller)."""
    from sdsx.pruners import magnitude, sparsegpt, wanda

    if method == "magnitude":
        return (lambda name, W, H: magnitude(W, spec)), "none"
    if method == "wanda":
        return (lambda name, W, H: wanda(W, H, spec)), "diag"

    def fasterprune(name: str, W: torch.Tensor, H: torch.Tensor) -> Any:
        # every layer factors its own H, as the published code does
        return sparsegpt(W, H, spec, blocksize, percdamp, name, report_error=False)

    return fasterprune, "full"


@contextlib.contextmanager
def forced_reference():
    old = os.environ.get("SDSX_FORCE_REFERENCE")
    os.environ["SDSX_FORCE_REFERENCE"] = "1"  # sdsx._ext.use_extension() reads it at every call
    try:
        yield
    finally:
        if old is None:
            del os.environ["SDSX_FORCE_REFERENCE"]
        else:
            os.environ["SDSX_FORCE_REFERENCE"] = old


def prune_reference(model, calib, method: str, pattern: str, blocksize: int, percdamp: float, progress: bool, device: str = "cpu"):
    from sdsx.api import Plan, report_from, run_driver, validate
    from sdsx.model.driver import DriverOptions
    from sdsx.pruners import SparsitySpec

    start = time.perf_counter()
    spec = SparsitySpec.parse(pattern)
    layer_fn, stats = reference_layer_fn(method, spec, blocksize, percdamp)
    plan = validate(model, calib, spec, need_calib=stats != "none")
    if stats == "none":
        plan = Plan(spec, None)
    with forced_reference():
        engine = DriverOptions(device=device, offload=True, stats=stats, progress=progress, desc=f"reference {method} {spec}",
                               accumulator=PublishedAccumulator, share_inputs=False)
        result = run_driver(model, plan, layer_fn, engine)
    report = report_from(result, method, spec, dict(pipeline="reference"))
    report.total_s = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------- bookkeeping
def linear_weights(model) -> dict[str, torch.nn.Module]:
    from sdsx.model import find_blocks, find_linears

    blocks = find_blocks(model)
    out: dict[str, torch.nn.Module] = {}
    for i, block in enumerate(blocks.layers):
        out.update(find_linears(block, prefix=f"{blocks.path}.{i}"))
    return out


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in linear_weights(model).items()}


@torch.no_grad()
def restore(model, weights: dict[str, torch.Tensor]) -> None:
    for n, m in linear_weights(model).items():
        m.weight.copy_(weights[n])


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mask agreement and largest weight difference between two pruned models."""
    same = total = 0
    diff = 0.0
    for n, wa in a.items():
        wb = b[n]
        same += int(((wa != 0) == (wb != 0)).sum())
        total += wa.numel()
        diff = max(diff, float((wa - wb).abs().max()))
    return {"mask_agreement": same / total, "max_weight_diff": diff}


def timings(report) -> dict[str, float]:
    return {
        "forward_s": report.forward_s,
        "stats_s": report.stats_s,
        "solver_s": report.solver_s,
        "pruning_s": report.stats_s + report.solver_s,
        "total_s": report.total_s,
        "peak_memory_bytes": report.peak_memory_bytes,
        "overall_sparsity": report.overall_sparsity,
    }


def ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def fmt(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def markdown(record: dict[str, Any]) -> str:
    cfg = record["config"]
    lines = [
        f"SmolLM2-135M, calibration {cfg['nsamples']} x {cfg['seqlen']} tokens from {Path(cfg['calib']).name}, "
        f"perplexity on {Path(cfg['wikitext']).name} in {cfg['eval_seqlen']}-token windows"
        + (f" (first {cfg['max_windows']})" if cfg["max_windows"] else " (all)")
        + f", {cfg['threads']} thread(s), extension: {record['backend'].get('extension_loaded')}",
        "",
        "| method | pattern | ppl | ref ppl | forward s | stats s (ref) | solver s (ref) | pruning s (ref) | "
        "total s (ref) | solver speedup | pruning speedup | end-to-end speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if record.get("dense_ppl") is not None:
        lines.append(f"| dense | - | {record['dense_ppl']:.2f} | | | | | | | | | |")
    order = {m: i for i, m in enumerate(METHODS)}
    porder = {q: i for i, q in enumerate(PATTERNS)}
    runs = sorted(record["runs"], key=lambda r: (order.get(r["method"], 9), porder.get(r["pattern"], 9)))
    for run in runs:
        s, r = run["sdsx"], run.get("reference")
        pair = (lambda k: f"{s[k]:.1f} ({r[k]:.1f})") if r else (lambda k: f"{s[k]:.1f}")
        lines.append(
            f"| {run['method']} | {run['pattern']} | {fmt(run.get('ppl'))} | {fmt(run.get('ref_ppl'))} | "
            f"{s['forward_s']:.1f} | {pair('stats_s')} | {pair('solver_s')} | {pair('pruning_s')} | {pair('total_s')} | "
            f"{fmt(run.get('solver_speedup'))}x | {fmt(run.get('pruning_speedup'))}x | {fmt(run.get('end_to_end_speedup'))}x |"
        )
    if record.get("methods"):
        lines += ["", "| method | solver speedup | pruning speedup | end-to-end speedup | patterns timed |", "|---|---:|---:|---:|---|"]
        for method, m in record["methods"].items():
            lines.append(
                f"| {method} | {fmt(m['solver_speedup'])}x | {fmt(m['pruning_speedup'])}x | "
                f"{fmt(m['end_to_end_speedup'])}x | {', '.join(m['patterns'])} |"
            )
    return "\n".join(lines) + "\n"


def summarise(record: dict[str, Any]) -> None:
    """Per method: speedups over the sum of the timed patterns."""
    methods: dict[str, Any] = {}
    for run in record["runs"]:
        if not run.get("reference"):
            continue
        m = methods.setdefault(run["method"], {"patterns": [], "sdsx": {}, "reference": {}})
        m["patterns"].append(run["pattern"])
        for side in ("sdsx", "reference"):
            for k in ("forward_s", "stats_s", "solver_s", "pruning_s", "total_s"):
                m[side][k] = m[side].get(k, 0.0) + run[side][k]
    for m in methods.values():
        s, r = m["sdsx"], m["reference"]
        m["solver_speedup"] = ratio(r["solver_s"], s["solver_s"])
        m["pruning_speedup"] = ratio(r["pruning_s"], s["pruning_s"])
        m["end_to_end_speedup"] = ratio(r["total_s"], s["total_s"])
    record["methods"] = methods


def save(record: dict[str, Any], json_path: Path | None, md_path: Path | None) -> None:
    summarise(record)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(json_path)
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(markdown(record))


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--wikitext", type=Path, default=DEFAULT_WIKITEXT)
    p.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    p.add_argument("--seed", type=int, default=0)
    # SparseGPT first: the longest run gives the headline numbers if the run is cut short.
    p.add_argument("--methods", default="sparsegpt,wanda,magnitude")
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--ref-patterns", default=None, help="patterns to time the reference pipeline on (default: all of --patterns; 'none' skips it)")
    p.add_argument("--ref-ppl", default="sparsegpt", help="methods whose reference-pruned model is also evaluated ('none' for none)")
    p.add_argument("--no-ppl", action="store_true", help="skip all perplexity evaluations (timing only)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where blocks run (cpu, cuda); the model itself stays on CPU")
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None, help="markdown output (default: next to --json)")
    p.add_argument("--progress", action="store_true", help="show per-block progress bars")
    p.add_argument("--resume", action="store_true",
                   help="keep the dense perplexity and finished runs of an existing --json made with the same settings")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("sdsx").setLevel(logging.WARNING)  # per-block lines would drown the summary
    torch.set_num_threads(args.threads)

    import sdsx
    from sdsx.data import calibration, encode, load_text
    from sdsx.eval import perplexity
    from sdsx.model import load_smollm2

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    patterns = [s.strip() for s in args.patterns.split(",") if s.strip()]
    ref_patterns = patterns if args.ref_patterns is None else (
        [] if args.ref_patterns == "none" else [s.strip() for s in args.ref_patterns.split(",")]
    )
    ref_ppl = set() if args.ref_ppl == "none" else {m.strip() for m in args.ref_ppl.split(",")}
    for path, flag in ((args.calib, "--calib"), (args.wikitext, "--wikitext")):
        if not path.is_file() and not (flag == "--wikitext" and args.no_ppl):
            p.error(f"{flag} {path} does not exist")
    json_path = args.json
    md_path = args.md or (json_path.with_suffix(".md") if json_path else None)

    say = logging.getLogger("bench").info
    model, tokenizer = load_smollm2()
    calib = calibration(args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    eval_ids = None if args.no_ppl else encode(tokenizer, load_text(args.wikitext))
    record: dict[str, Any] = {
        "config": dict(
            vars(args), wikitext=str(args.wikitext), calib=str(args.calib), json=str(json_path), md=str(md_path),
            command=" ".join(["python", "bench/prune.py"] + (argv if argv is not None else sys.argv[1:])),
        ),
        "backend": sdsx.backend_info(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "eval_tokens": None if eval_ids is None else int(eval_ids.numel()),
        "dense_ppl": None,
        "runs": [],
    }
    say("backend: %s", record["backend"])
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if args.resume and json_path and json_path.is_file():
        old = json.loads(json_path.read_text())
        same = ("nsamples", "seqlen", "eval_seqlen", "max_windows", "seed", "threads", "blocksize", "percdamp", "wikitext", "calib")
        if all(old["config"].get(k) == record["config"].get(k) for k in same) and old["config"].get("device", "cpu") == args.device:
            record["dense_ppl"] = old.get("dense_ppl")
            done = {(r["method"], r["pattern"]): r for r in old.get("runs", [])}
            say("resuming: dense %s, %d finished runs", record["dense_ppl"], len(done))
        else:
            say("not resuming: %s was made with other settings", json_path)

    def ppl(m) -> float | None:
        if eval_ids is None:
            return None
        t0 = time.perf_counter()
        value = perplexity(m, eval_ids, seqlen=args.eval_seqlen, batch_size=args.eval_batch_size,
                           max_windows=args.max_windows, device=args.device, progress=args.progress)
        say("  perplexity %.3f (%.0fs)", value, time.perf_counter() - t0)
        return value

    dense = snapshot(model)
    if record["dense_ppl"] is None:
        say("dense")
        record["dense_ppl"] = ppl(model)
        save(record, json_path, md_path)

    for method in methods:
        for pattern in patterns:
            previous = done.get((method, pattern))
            if previous is not None and (pattern not in ref_patterns or "reference" in previous):
                record["runs"].append(previous)
                continue
            run: dict[str, Any] = {"method": method, "pattern": pattern}
            restore(model, dense)
            say("%s %s: sdsx", method, pattern)
            report = sdsx.prune(model, calib, method, pattern, blocksize=args.blocksize, percdamp=args.percdamp,
                                device=args.device, report_error=False, progress=args.progress)
            run["sdsx"] = timings(report)
            say("  %s", run["sdsx"])
            run["ppl"] = ppl(model)
            if pattern in ref_patterns:
                mine = snapshot(model)
                restore(model, dense)
                say("%s %s: reference", method, pattern)
                ref = prune_reference(model, calib, method, pattern, args.blocksize, args.percdamp, args.progress, args.device)
                run["reference"] = timings(ref)
                say("  %s", run["reference"])
                run.update(compare(mine, snapshot(model)))
                run["solver_speedup"] = ratio(ref.solver_s, report.solver_s)
                run["pruning_speedup"] = ratio(ref.stats_s + ref.solver_s, report.stats_s + report.solver_s)
                run["end_to_end_speedup"] = ratio(ref.total_s, report.total_s)
                if method in ref_ppl:
                    run["ref_ppl"] = ppl(model)
                    if run.get("ppl") and run["ref_ppl"]:
                        run["ppl_rel_diff"] = run["ppl"] / run["ref_ppl"] - 1
                del mine
            record["runs"].append(run)
            save(record, json_path, md_path)
    restore(model, dense)
    save(record, json_path, md_path)
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
