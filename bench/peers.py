"""sdsx against llm-compressor (its `oneshot` with SparseGPTModifier / WandaPruningModifier), side by
side on SmolLM2-135M: the same model, the same calibration token windows, the same evaluation.

The full table (3 calibration seeds x SparseGPT, Wanda x 2:4, 50%; hours on one core):

    python bench/peers.py --methods sparsegpt,wanda --patterns 2:4,0.5 --seeds 0,1,2 \\
        --nsamples 32 --seqlen 512 --max-windows 32 --peer-python /work/.venv-peers/bin/python \\
        --json bench/results/peers/peers.json --md bench/results/peers/peers.md \\
        --plot bench/results/peers/peers_ppl.png

Every (library, method, pattern, seed) runs in its own process (``--worker``), so that the peak
RSS is that run's; the two libraries run back to back, alternating which goes first from one seed
to the next, at one thread. llm-compressor pins its own transformers, so it usually lives in its
own virtual environment (``--peer-python``; ``pip install sdsx[peers]`` puts it next to sdsx
instead). Where it cannot be imported the bench says so and runs the sdsx rows alone.

Each worker saves the pruned weights of the decoder blocks' linears; this process loads them into
one model and computes WikiText-2 perplexity with ``sdsx.perplexity`` for both libraries (same
code, same transformers), and the kept positions both libraries have in common (a mask is
``weight != 0`` after pruning), per layer, per block and overall. A killed run continues where it
stopped: rows already in ``--json`` are skipped. See docs/peers.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, Python puts bench/ first on sys.path, and bench/kernels.py then shadows the PyPI
# package `kernels`, which transformers imports to see whether it is installed: in the peer's
# environment (no sdsx) that import fails and takes every model class with it. Nothing here
# imports from bench/.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ["SDSX_DATA"]) if os.environ.get("SDSX_DATA") else REPO.parent / "shared" / "data"
LIBRARIES = ("sdsx", "llmcompressor")
PEER = "llmcompressor"
BLOCKS_PREFIX = "model.layers."  # SmolLM2 (LLaMA layout): the decoder blocks whose linears both prune
PEER_PACKAGES = ("llmcompressor", "compressed-tensors", "transformers", "torch")
SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# what changes results: a JSON made with other values of these is not resumed
SETTINGS = ("calib", "holdout", "nsamples", "seqlen", "wikitext", "eval_seqlen", "max_windows", "threads",
            "sdsx_options", "peer_options")
TIMING = {
    "sdsx": "sdsx.prune's PruneReport: forward_s (block forward passes), stats_s (Gram accumulation and "
            "finalisation), solver_s (layer functions with write-back); other_s = wall_s - the three; wall_s is "
            "the sdsx.prune call",
    PEER: "timers wrapped around llm-compressor's methods at run time: stats_s = the modifier's calibrate_module "
          "hook (Hessian / row-norm accumulation), solver_s = its compress_modules (mask selection, SparseGPT "
          "sweep, write-back), forward_s = Subgraph.forward time (calibration and propagation passes) minus the "
          "hook time inside it, other_s = wall_s - the three (tracing the subgraphs: trace_s, session set-up, "
          "activation cache); wall_s is the oneshot call",
}


# ------------------------------------------------------------------------------ pure helpers
def parse_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_value(text: str) -> Any:
    """A Python literal ("64", "0.01", "False", "['re:.*lm_head']"; true/false/none in any case), else the text."""
    lowered = {"true": True, "false": False, "none": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["report_error=False", "blocksize=64"]`` -> ``{"report_error": False, "blocksize": 64}``."""
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"an option is key=value, got {item!r}")
        out[key.strip()] = parse_value(val.strip())
    return out


def sdsx_sparsity(pattern: str) -> float | str:
    """The ``sparsity`` argument of ``sdsx.prune``: "2:4" stays a string, "0.5" becomes 0.5."""
    return pattern if ":" in pattern else float(pattern)


def peer_sparsity(pattern: str) -> dict[str, Any]:
    """llm-compressor's sparsity arguments for a pattern in sdsx's notation.

    sdsx's "N:M" keeps N of every M inputs; llm-compressor's ``mask_structure`` "n:m" prunes n of
    every m (its ``topk(..., prune_n, largest=False)`` marks the pruned ones), so "2:4" maps to
    itself but "1:4" would map to "3:4".
    """
    if ":" in pattern:
        keep, group = (int(x) for x in pattern.split(":"))
        if not 0 < keep < group:
            raise ValueError(f"an N:M pattern needs 0 < N < M, got {pattern!r}")
        return {"sparsity": (group - keep) / group, "mask_structure": f"{group - keep}:{group}"}
    fraction = float(pattern)
    if not 0 < fraction < 1:
        raise ValueError(f"an unstructured sparsity lies in (0, 1), got {pattern!r}")
    return {"sparsity": fraction, "mask_structure": "0:0"}


def pattern_label(pattern: str) -> str:
    return pattern if ":" in pattern else f"{float(pattern):.0%}"


def method_label(method: str) -> str:
    return {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "Magnitude"}.get(method, method)


def library_label(library: str) -> str:
    return "llm-compressor" if library == PEER else library


def run_key(library: str, method: str, pattern: str, seed: int) -> str:
    return f"{library}_{method}_{pattern.replace(':', '-')}_s{seed}"


def run_order(seeds: list[int], methods: list[str], patterns: list[str], libraries: list[str]) -> list[tuple[int, str, str, str]]:
    """(seed, method, pattern, library) in running order: the libraries of one configuration back
    to back, and which goes first alternates from one seed to the next (and from one configuration
    to the next within a seed), so that neither always runs on a machine the other has just warmed."""
    out = []
    for i, seed in enumerate(seeds):
        for j, (method, pattern) in enumerate((m, p) for m in methods for p in patterns):
            order = libraries if (i + j) % 2 == 0 else list(reversed(libraries))
            out += [(seed, method, pattern, lib) for lib in order]
    return out


def block_of(name: str) -> int | None:
    """The decoder block index in a layer name ("model.layers.7.mlp.up_proj" -> 7)."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def mask_agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Kept positions in common of two sets of masks (True = kept), per layer, per block, overall.

    ``common`` is |A and B| / mean(|A|, |B|): the fraction of kept positions both keep (equal to
    |A and B| / |A| when both keep as many, as N:M masks do; symmetric when an unstructured
    threshold keeps a few more on one side). Counts are kept too, so other measures can be derived.
    """
    if a.keys() != b.keys():
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"the two libraries pruned different layers: {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def common(both: int, ka: int, kb: int) -> float:
        return 2 * both / (ka + kb) if ka + kb else 1.0

    layers, blocks = {}, {}
    total = [0, 0, 0, 0]  # both, kept a, kept b, numel
    for name in sorted(a, key=lambda n: (block_of(n) if block_of(n) is not None else -1, n)):
        ma, mb = a[name], b[name]
        if tuple(ma.shape) != tuple(mb.shape):
            raise ValueError(f"{name}: mask shapes differ, {tuple(ma.shape)} against {tuple(mb.shape)}")
        counts = [int((ma & mb).sum()), int(ma.sum()), int(mb.sum()), _numel(ma)]
        layers[name] = {"common": common(*counts[:3]), "both": counts[0], "kept_a": counts[1], "kept_b": counts[2], "numel": counts[3]}
        blk = block_of(name)
        acc = blocks.setdefault(blk, [0, 0, 0, 0])
        for k in range(4):
            acc[k] += counts[k]
            total[k] += counts[k]
    return {
        "common": common(*total[:3]),
        "both": total[0], "kept_a": total[1], "kept_b": total[2], "numel": total[3],
        "per_block": [{"block": blk, "common": common(*c[:3])} for blk, c in sorted(blocks.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))],
        "per_layer": {name: round(v["common"], 6) for name, v in layers.items()},
    }


def _numel(x: Any) -> int:
    return int(x.numel()) if hasattr(x, "numel") else int(x.size)  # a torch tensor or a numpy array


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1; None with one value)."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def fmt_mean_sd(values: list[float], digits: int = 2, pct: bool = False) -> str:
    m, s = mean_sd(values)
    if m is None:
        return ""
    f = (lambda x: f"{100 * x:.{digits}f}%") if pct else (lambda x: f"{x:.{digits}f}")
    return f(m) if s is None else f"{f(m)} ± {f(s)}"


def supersede(state: dict[str, Any], selectors: list[str], why: str) -> int:
    """Move the rows (and mask agreements) that ``selectors`` name into ``state["superseded"]``, so
    that the run does them again; returns how many rows moved.

    A selector is a method ("wanda") or a method and a pattern ("wanda:0.5", "wanda:2:4"). The old
    rows stay in the file, each with ``why`` (e.g. the commit that changed the code), and leave
    the tables and ratios.
    """

    def same_pattern(a: str, b: str) -> bool:
        return a == b if ":" in a or ":" in b else float(a) == float(b)

    def named(item: dict) -> bool:
        for sel in selectors:
            method, _, pattern = sel.partition(":")
            if item["method"] == method and (not pattern or same_pattern(str(item["pattern"]), pattern)):
                return True
        return False

    moved = [r for r in state["rows"] if named(r)]
    old_agreement = [a for a in state["agreement"] if named(a)]
    state["rows"][:] = [r for r in state["rows"] if not named(r)]
    state["agreement"][:] = [a for a in state["agreement"] if not named(a)]
    store = state.setdefault("superseded", [])
    store.extend(dict(r, superseded=why) for r in moved)
    store.extend(dict(a, kind="agreement", superseded=why) for a in old_agreement)
    return len(moved)


def ok_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def summarize(rows: list[dict], agreement: list[dict]) -> list[dict]:
    """One entry per (method, pattern): per library the values over seeds, and per seed the
    sdsx / peer ratios of the pair that ran back to back."""
    rows = ok_rows(rows)
    configs = sorted({(r["method"], r["pattern"]) for r in rows}, key=lambda mp: (mp[0], ":" not in mp[1], mp[1]))
    out = []
    for method, pattern in configs:
        entry: dict[str, Any] = {"method": method, "pattern": pattern, "libraries": {}, "ratios": {}}
        by_lib = {}
        for lib in LIBRARIES:
            mine = sorted((r for r in rows if (r["method"], r["pattern"], r["library"]) == (method, pattern, lib)), key=lambda r: r["seed"])
            if not mine:
                continue
            by_lib[lib] = {r["seed"]: r for r in mine}
            entry["libraries"][lib] = {
                "seeds": [r["seed"] for r in mine],
                **{k: [r.get(k) for r in mine] for k in ("ppl", "wall_s", "pruning_s", "forward_s", "stats_s", "solver_s", "peak_rss_mib")},
            }
        if len(by_lib) == 2:
            seeds = sorted(set(by_lib["sdsx"]) & set(by_lib[PEER]))
            for key in ("wall_s", "pruning_s", "peak_rss_mib"):
                entry["ratios"][key] = [by_lib["sdsx"][s][key] / by_lib[PEER][s][key] for s in seeds
                                        if by_lib[PEER][s].get(key) and by_lib["sdsx"][s].get(key) is not None]
            entry["ratios"]["seeds"] = seeds
        agree = sorted((a for a in agreement if (a["method"], a["pattern"]) == (method, pattern)), key=lambda a: a["seed"])
        entry["common"] = [a["common"] for a in agree]
        entry["common_by_block"] = _mean_by_block(agree)
        out.append(entry)
    return out


def _mean_by_block(agree: list[dict]) -> list[float]:
    if not agree:
        return []
    depth = min(len(a["per_block"]) for a in agree)
    return [statistics.fmean(a["per_block"][i]["common"] for a in agree) for i in range(depth)]


def agreement_for(agreement: list[dict], method: str, pattern: str, seed: int) -> dict | None:
    return next((a for a in agreement if (a["method"], a["pattern"], a["seed"]) == (method, pattern, seed)), None)


def to_markdown(meta: dict, rows: list[dict], agreement: list[dict]) -> str:
    """The per-run table, the summary over seeds (with the sdsx / peer ratios) and the kept
    positions in common by block depth."""
    s = meta.get("settings", {})
    peer = meta.get("peer", {})
    lines = [
        f"SmolLM2-135M; calibration {s.get('nsamples')} x {s.get('seqlen')} tokens from {Path(str(s.get('calib'))).name} "
        f"(the same token windows for both libraries, one set per seed); WikiText-2 test perplexity over "
        f"{s.get('max_windows')} windows of {s.get('eval_seqlen')} tokens, computed by sdsx.perplexity for both; "
        f"{s.get('threads')} thread(s), one process per run, libraries back to back.",
        "",
        f"sdsx {meta.get('sdsx', {}).get('version', '?')} (torch {meta.get('sdsx', {}).get('torch', '?')}, transformers "
        f"{meta.get('sdsx', {}).get('transformers', '?')}); "
        + (f"llm-compressor {peer['versions'].get('llmcompressor')} (compressed-tensors {peer['versions'].get('compressed-tensors')}, "
           f"transformers {peer['versions'].get('transformers')}, torch {peer['versions'].get('torch')})"
           if peer.get("available") else f"llm-compressor not run: {peer.get('reason', 'unknown')}")
        + (f"; dense perplexity {meta['dense_ppl']:.2f}" if meta.get("dense_ppl") else ""),
        "",
        "| library | method | pattern | seed | wall s | forward s | statistics s | solver s | other s | pruning s | peak RSS MiB | ppl | kept in common | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {lib: i for i, lib in enumerate(LIBRARIES)}
    for r in sorted(rows, key=lambda r: (r["method"], ":" not in r["pattern"], r["pattern"], r["seed"], order.get(r["library"], 9))):
        a = agreement_for(agreement, r["method"], r["pattern"], r["seed"])
        if r.get("status") != "ok":
            lines.append(f"| {library_label(r['library'])} | {method_label(r['method'])} | {pattern_label(r['pattern'])} | {r['seed']} |"
                         + " |" * 9 + f" {r.get('status')}: {str(r.get('error', ''))[:80]} |")
            continue
        lines.append(
            f"| {library_label(r['library'])} | {method_label(r['method'])} | {pattern_label(r['pattern'])} | {r['seed']} | "
            f"{r['wall_s']:.1f} | {r['forward_s']:.1f} | {r['stats_s']:.1f} | {r['solver_s']:.1f} | {r['other_s']:.1f} | "
            f"{r['pruning_s']:.1f} | {'' if r.get('peak_rss_mib') is None else format(r['peak_rss_mib'], '.0f')} | {r['ppl']:.2f} | {'' if a is None else format(a['common'], '.2%')} | ok |"
        )
    summary = summarize(rows, agreement)
    if summary:
        lines += [
            "",
            "Over seeds: mean ± sample standard deviation (n - 1) of the seeds run. Ratios are sdsx / llm-compressor of the "
            "pair run back to back with the same seed (below 1: sdsx faster or smaller); pruning = statistics + solver, the "
            "time outside the forward passes.",
            "",
            "| method | pattern | library | seeds | ppl | wall s | pruning s | forward s | peak RSS MiB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for e in summary:
            for lib, v in e["libraries"].items():
                lines.append(
                    f"| {method_label(e['method'])} | {pattern_label(e['pattern'])} | {library_label(lib)} | {len(v['seeds'])} | "
                    f"{fmt_mean_sd(v['ppl'])} | {fmt_mean_sd(v['wall_s'], 1)} | {fmt_mean_sd(v['pruning_s'], 1)} | "
                    f"{fmt_mean_sd(v['forward_s'], 1)} | {fmt_mean_sd(v['peak_rss_mib'], 0)} |"
                )
        lines += [
            "",
            "| method | pattern | pairs | wall sdsx / peer | pruning sdsx / peer | peak RSS sdsx / peer | kept in common | block 0 | last block |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in summary:
            r = e["ratios"]
            by_block = e["common_by_block"]
            lines.append(
                f"| {method_label(e['method'])} | {pattern_label(e['pattern'])} | {len(r.get('seeds', []))} | "
                f"{fmt_mean_sd(r.get('wall_s', []))} | {fmt_mean_sd(r.get('pruning_s', []))} | {fmt_mean_sd(r.get('peak_rss_mib', []))} | "
                f"{fmt_mean_sd(e['common'], pct=True)} | {format(by_block[0], '.2%') if by_block else ''} | {format(by_block[-1], '.2%') if by_block else ''} |"
            )
        with_blocks = [e for e in summary if e["common_by_block"]]
        if with_blocks:
            lines += [
                "",
                "Kept positions in common by block depth (mean over seeds):",
                "",
                "| block | " + " | ".join(f"{method_label(e['method'])} {pattern_label(e['pattern'])}" for e in with_blocks) + " |",
                "|---:|" + "---:|" * len(with_blocks),
            ]
            for i in range(max(len(e["common_by_block"]) for e in with_blocks)):
                cells = [f"{e['common_by_block'][i]:.2%}" if i < len(e["common_by_block"]) else "" for e in with_blocks]
                lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += ["", "How each time is measured:", ""] + [f"- {library_label(k)}: {v}" for k, v in TIMING.items()]
    lines += ["", "Peak RSS: the worker process's own high-water mark (VmHWM of /proc/self/status, taken right after "
              "the pruning call, before the weights are saved). A blank: not measured that way (see the row's peak_rss_note)."]
    return "\n".join(lines) + "\n"


def plot_ppl(rows: list[dict], path: Path) -> None:
    """Perplexity per seed for both libraries, one panel per method and pattern."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ok_rows(rows)
    configs = sorted({(r["method"], r["pattern"]) for r in rows}, key=lambda mp: (mp[0], ":" not in mp[1], mp[1]))
    if not configs:
        return
    fig, axes = plt.subplots(1, len(configs), figsize=(3.6 * len(configs), 3.4), squeeze=False)
    for ax, (method, pattern) in zip(axes[0], configs):
        for lib, marker in zip(LIBRARIES, ("o", "s")):
            mine = sorted((r for r in rows if (r["method"], r["pattern"], r["library"]) == (method, pattern, lib)), key=lambda r: r["seed"])
            if mine:
                ax.plot([r["seed"] for r in mine], [r["ppl"] for r in mine], marker=marker, linestyle="-", label=library_label(lib))
        ax.set_title(f"{method_label(method)} {pattern_label(pattern)}")
        ax.set_xlabel("calibration seed")
        ax.set_xticks(sorted({r["seed"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("WikiText-2 perplexity")
    axes[0][-1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ workers
def _peak_rss_bytes() -> int:
    """This process's peak resident set size since it started (exec'd).

    On Linux getrusage's ru_maxrss is no good for that: execve keeps the high-water mark of the
    memory it replaces, so a worker reports at least the RSS of the parent that forked it (the
    parent holds the evaluated models, 2.4 GiB by the fourth run). /proc/self/status's VmHWM is the
    high-water mark of the worker's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def _block_linears(model) -> dict[str, Any]:
    import torch

    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith(BLOCKS_PREFIX)}


def _checksums(model, skip: set[str]) -> dict[str, float]:
    """A sum per parameter outside the pruned linears: proof that neither library touched them
    (the tied embedding / LM head above all)."""
    return {n: float(p.detach().double().sum()) for n, p in model.named_parameters() if n not in skip}


def _worker(spec_path: str) -> int:
    """Run one configuration: load the model, prune with one library, save the linears' weights
    and a result JSON (timings, peak RSS, versions)."""
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import AutoModelForCausalLM

    calib = torch.load(spec["calib_path"])
    digest = hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model.eval()
    linears = _block_linears(model)
    skip = {f"{n}.weight" for n in linears} | {f"{n}.bias" for n in linears}
    before = _checksums(model, skip)
    run = _run_sdsx if spec["library"] == "sdsx" else _run_peer
    result = run(model, calib, spec)
    result["peak_rss_bytes"] = _peak_rss_bytes()  # before saving: the run's own peak
    after = _checksums(model, skip)
    result["other_params_changed"] = [n for n in before if before[n] != after.get(n)]
    result.update(
        calib_sha256=digest, calib_shape=list(calib.shape), threads=torch.get_num_threads(),
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        python=platform.python_version(), layers=len(linears),
    )
    from safetensors.torch import save_file

    save_file({f"{n}.weight": m.weight.detach().to("cpu").contiguous() for n, m in linears.items()}, spec["weights_path"])
    result["process_s"] = time.perf_counter() - started
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2))
    return 0


def _run_sdsx(model, calib, spec) -> dict:
    import sdsx

    rss_before = _peak_rss_bytes()  # the model loaded and the library imported
    t0 = time.perf_counter()
    rep = sdsx.prune(model, calib, spec["method"], sdsx_sparsity(spec["pattern"]), progress=False, **spec["options"])
    wall = time.perf_counter() - t0
    return dict(
        wall_s=wall, forward_s=rep.forward_s, stats_s=rep.stats_s, solver_s=rep.solver_s,
        other_s=wall - rep.forward_s - rep.stats_s - rep.solver_s, report_total_s=rep.total_s,
        options=rep.options, total_error=rep.total_error if math.isfinite(rep.total_error) else None,
        versions={"sdsx": sdsx.__version__, **_versions(("torch", "transformers"))}, backend=sdsx.backend_info(),
        peak_rss_before_bytes=rss_before,
    )


def _run_peer(model, calib, spec) -> dict:
    """llm-compressor's oneshot on the same windows, with timers wrapped around its hook, its
    compress step, the subgraph forwards and the tracing (read from its source: the modifiers'
    ``calibrate_module`` / ``compress_modules``, ``Subgraph.forward``, ``trace_subgraphs``)."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.pipelines.sequential import helpers as seq_helpers
    from llmcompressor.pipelines.sequential import pipeline as seq_pipeline
    from torch.utils.data import DataLoader

    timers = {"hook": 0.0, "compress": 0.0, "subgraph_forward": 0.0, "trace": 0.0}
    calls = dict.fromkeys(timers, 0)

    def wrap(owner, attr, key):
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers[key] += time.perf_counter() - t
                calls[key] += 1

        setattr(owner, attr, timed)

    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[spec["method"]]
    wrap(cls, "calibrate_module", "hook")
    wrap(cls, "compress_modules", "compress")
    wrap(seq_helpers.Subgraph, "forward", "subgraph_forward")
    wrap(seq_pipeline, "trace_subgraphs", "trace")
    kwargs = {**peer_sparsity(spec["pattern"]), "ignore": ["re:.*lm_head"], **spec["options"]}
    modifier = cls(**kwargs)
    # pre-tokenized windows, one per batch, exactly the ids sdsx gets (a DataLoader skips
    # oneshot's own dataset loading and tokenization)
    loader = DataLoader([{"input_ids": row} for row in calib], batch_size=1, shuffle=False)
    rss_before = _peak_rss_bytes()
    t0 = time.perf_counter()
    oneshot(model=model, recipe=modifier, dataset=loader, output_dir=None)
    wall = time.perf_counter() - t0
    forward = timers["subgraph_forward"] - timers["hook"]
    if not calls["hook"] or not calls["compress"]:
        raise RuntimeError(f"the timers saw no hook or compress calls ({calls}): llm-compressor's internals moved")
    model.to(torch.device("cpu"))
    return dict(
        wall_s=wall, forward_s=forward, stats_s=timers["hook"], solver_s=timers["compress"],
        other_s=wall - forward - timers["hook"] - timers["compress"], trace_s=timers["trace"], timer_calls=calls,
        options={**kwargs, "pipeline": "oneshot default (independent -> sequential)", "batch_size": 1},
        versions=_versions(PEER_PACKAGES), peak_rss_before_bytes=rss_before,
    )


# ------------------------------------------------------------------------------------- parent
PROBE = (
    "import json, importlib.metadata as m\n"
    "from llmcompressor import oneshot\n"
    "from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier\n"
    "from llmcompressor.pipelines.sequential.helpers import Subgraph\n"
    f"print(json.dumps({{p: m.version(p) for p in {PEER_PACKAGES!r}}}))\n"
)


def probe_peer(python: str | None) -> dict:
    """Whether llm-compressor imports in ``python`` (and its versions), or why not."""
    if not python:
        return {"available": False, "reason": "no --peer-python given"}
    if not Path(python).exists():
        return {"available": False, "python": python, "reason": f"{python} does not exist (make the venv: see docs/peers.md)"}
    try:
        proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "python": python, "reason": f"{type(e).__name__}: {e}"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"available": False, "python": python, "reason": f"llmcompressor does not import there: {tail}"}
    return {"available": True, "python": python, "versions": json.loads(proc.stdout.strip().splitlines()[-1])}


def _git_rev(path: Path) -> str | None:
    """The commit of the checkout holding ``path``, with "+dirty" when files under ``path`` differ from it."""
    try:
        rev = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def _worker_env(threads: int, library: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(threads) for k in SINGLE_THREAD_ENV})
    if library == "sdsx":
        env["SDSX_REQUIRE_EXTENSION"] = "1"  # the native ops or nothing: never time the reference by accident
        env.pop("SDSX_FORCE_REFERENCE", None)
    return env


def save_masks(weights: dict, path: Path) -> dict:
    """Save ``weight != 0`` of every layer, bit-packed; return the masks as bool arrays."""
    import numpy as np

    masks = {n.removesuffix(".weight"): (w != 0).numpy() for n, w in weights.items()}
    np.savez(path, **{f"{n}|{'x'.join(map(str, m.shape))}": np.packbits(m.reshape(-1)) for n, m in masks.items()})
    return masks


def load_masks(path: Path) -> dict:
    import numpy as np

    out = {}
    with np.load(path) as z:
        for key in z.files:
            name, _, shape = key.rpartition("|")
            dims = tuple(int(x) for x in shape.split("x"))
            out[name] = np.unpackbits(z[key], count=math.prod(dims)).astype(bool).reshape(dims)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="sparsegpt,wanda")
    p.add_argument("--patterns", default="2:4,0.5")
    p.add_argument("--redo", default="",
                   help="comma list of method or method:pattern (wanda, wanda:0.5) whose rows in --json run again: the old "
                        "rows move to the JSON's `superseded` list with the commit that replaced them")
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds (the windows differ per seed, both libraries get the same)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib", default=str(DATA / "calib" / "sotu_1990_2021.txt"))
    p.add_argument("--holdout", type=float, default=0.15,
                   help="tail of the calibration text's tokens kept out of calibration, as bench/sds.py does (same windows per seed)")
    p.add_argument("--wikitext", default=str(DATA / "wikitext2" / "wiki.test.raw"))
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=32, help="WikiText-2 test windows evaluated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peer-python", default=os.environ.get("SDSX_PEER_PYTHON", sys.executable),
                   help="the python of an environment with llmcompressor (default: this one)")
    p.add_argument("--no-peer", action="store_true", help="run the sdsx rows only")
    p.add_argument("--sdsx-option", action="append", default=[], help="sdsx.prune keyword, e.g. report_error=False")
    p.add_argument("--peer-option", action="append", default=[], help="modifier keyword, e.g. dampening_frac=0.01")
    p.add_argument("--model-dir", default=None, help="the converted SmolLM2 folder (default: sdsx's cache)")
    p.add_argument("--work-dir", type=Path, default=None, help="calibration ids, weights, masks, logs, in a subfolder per settings (default: <sdsx cache>/peers)")
    p.add_argument("--keep-weights", action="store_true", help="keep each run's pruned weights (400 MiB each)")
    p.add_argument("--timeout", type=int, default=4 * 3600, help="seconds one worker may take")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "peers" / "peers.json")
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker)

    import torch

    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    import sdsx
    from sdsx.data import load_text
    from sdsx.data.calibration import encode
    from sdsx.data.paths import cache_root
    from sdsx.model.smollm2 import default_cache_dir, load_smollm2

    methods, patterns = parse_list(args.methods), parse_list(args.patterns)
    seeds = [int(s) for s in parse_list(args.seeds)]
    for pat in patterns:
        peer_sparsity(pat)  # fail early on a bad pattern
    settings = dict(calib=args.calib, holdout=args.holdout, nsamples=args.nsamples, seqlen=args.seqlen, wikitext=args.wikitext,
                    eval_seqlen=args.eval_seqlen, max_windows=args.max_windows, threads=args.threads,
                    sdsx_options=parse_options(args.sdsx_option), peer_options=parse_options(args.peer_option))
    # one folder per settings: masks of runs made with other settings never meet
    work = (args.work_dir or cache_root() / "peers") / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    (work / "runs").mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else default_cache_dir()

    state: dict[str, Any] = {"meta": {}, "rows": [], "agreement": []}
    if args.json.exists():
        state = json.loads(args.json.read_text())
        old = state.get("meta", {}).get("settings", {})
        differs = [k for k in SETTINGS if k in old and old[k] != settings[k]]
        if differs:
            raise SystemExit(f"{args.json} holds runs made with other settings ({', '.join(f'{k}: {old[k]!r} there, {settings[k]!r} now' for k in differs)}); "
                             "give another --json, or the same settings to continue it")
        if args.redo:
            why = f"rerun by bench {_git_rev(REPO)} (--redo {args.redo})"
            print(f"--redo {args.redo}: {supersede(state, parse_list(args.redo), why)} row(s) moved to superseded", flush=True)
        print(f"resuming {args.json}: {len(ok_rows(state['rows']))} rows done", flush=True)
    meta, rows, agreement = state["meta"], state["rows"], state["agreement"]
    peer = {"available": False, "reason": "--no-peer"} if args.no_peer else probe_peer(args.peer_python)
    if peer["available"]:
        print(f"llm-compressor {peer['versions']['llmcompressor']} in {peer['python']}: {peer['versions']}", flush=True)
    else:
        print(f"llm-compressor is not available ({peer['reason']}): skipping its rows, running sdsx only", flush=True)
    meta.update(
        settings=settings, model="SmolLM2-135M", model_dir=str(model_dir), eval="WikiText-2 test", peer=peer,
        sdsx={"version": sdsx.__version__, "path": str(Path(sdsx.__file__).parent), "git": _git_rev(Path(sdsx.__file__).parent),
              "python": sys.executable, **_versions(("torch", "transformers"))},
        bench_git=_git_rev(REPO), machine=platform.machine(), timing=TIMING,
        mask="weight != 0 after pruning; kept in common = |A and B| / mean(|A|, |B|) over the decoder blocks' linears",
        spread="sample standard deviation over calibration seeds (n - 1)",
        order="per configuration the two libraries back to back, which goes first alternating between seeds",
    )

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(state, indent=2))

    model, tok = load_smollm2(model_dir)
    eval_ids = encode(tok, load_text(args.wikitext))
    linear_names = {f"{n}.weight" for n in _block_linears(model)}

    def ppl(m) -> float:
        return sdsx.perplexity(m, eval_ids, seqlen=args.eval_seqlen, max_windows=args.max_windows, progress=False)

    if meta.get("dense_ppl") is None:
        meta["dense_ppl"] = ppl(model)
        print(f"dense perplexity {meta['dense_ppl']:.2f}", flush=True)
        save()
    sd = model.state_dict()
    dense = {n: sd[n].clone() for n in linear_names}

    # the calibration windows of every seed, made once here and fed to both libraries
    calib_paths, digests = {}, meta.setdefault("calibration", {})
    for seed in seeds:
        windows = sdsx.calibration(args.calib, tok, args.nsamples, args.seqlen, seed, holdout=max(args.holdout, 0.0))
        path = work / f"calib_n{args.nsamples}_l{args.seqlen}_h{args.holdout}_s{seed}.pt"
        torch.save(windows, path)
        calib_paths[seed] = path
        digests[str(seed)] = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    save()

    libraries = ["sdsx"] + ([PEER] if peer["available"] else [])
    plan = run_order(seeds, methods, patterns, libraries)
    done = {run_key(r["library"], r["method"], r["pattern"], r["seed"]) for r in ok_rows(rows)}
    print(f"{len(plan)} runs, {sum(run_key(lib, m, pat, s) in done for s, m, pat, lib in plan)} already done", flush=True)
    for i, (seed, method, pattern, lib) in enumerate(plan, 1):
        key = run_key(lib, method, pattern, seed)
        head = f"[{i}/{len(plan)}] seed {seed} {method_label(method)} {pattern_label(pattern)} {library_label(lib)}"
        if key in done:
            print(f"{head}: done earlier, skipped", flush=True)
            continue
        spec = dict(library=lib, method=method, pattern=pattern, seed=seed, threads=args.threads, model_dir=str(model_dir),
                    calib_path=str(calib_paths[seed]), options=settings["sdsx_options" if lib == "sdsx" else "peer_options"],
                    weights_path=str(work / "runs" / f"{key}.safetensors"), result_path=str(work / "runs" / f"{key}.result.json"))
        spec_path = work / "runs" / f"{key}.spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        Path(spec["result_path"]).unlink(missing_ok=True)
        python = sys.executable if lib == "sdsx" else peer["python"]
        log_path = work / "runs" / f"{key}.log"
        print(f"{head}: running (log {log_path})", flush=True)
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(spec_path)], stdout=log, stderr=subprocess.STDOUT,
                                      env=_worker_env(args.threads, lib), cwd=REPO, timeout=args.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        row: dict[str, Any] = dict(library=lib, method=method, pattern=pattern, seed=seed, process_wall_s=time.perf_counter() - t0,
                                   bench_git=meta["bench_git"], sdsx_git=meta["sdsx"]["git"])
        rows[:] = [r for r in rows if run_key(r["library"], r["method"], r["pattern"], r["seed"]) != key]
        if rc != 0 or not Path(spec["result_path"]).exists():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            row.update(status="failed", error=f"exit {rc}: {tail[-1] if tail else ''}")
            rows.append(row)
            save()
            print(f"{head}: FAILED ({row['error']}); log tail:\n  " + "\n  ".join(tail), flush=True)
            continue
        result = json.loads(Path(spec["result_path"]).read_text())
        if result["calib_sha256"] != digests[str(seed)]:
            raise SystemExit(f"{key}: the worker saw other calibration ids ({result['calib_sha256']} against {digests[str(seed)]})")
        weights = load_file(spec["weights_path"])
        if set(weights) != linear_names:
            raise SystemExit(f"{key}: the saved weights are not the decoder blocks' linears ({sorted(set(weights) ^ linear_names)[:5]})")
        model.load_state_dict(weights, strict=False)
        masks = save_masks(weights, work / "runs" / f"{key}.masks.npz")
        kept = sum(int(m.sum()) for m in masks.values())
        numel = sum(m.size for m in masks.values())
        del weights
        if not args.keep_weights:
            Path(spec["weights_path"]).unlink()
        te = time.perf_counter()
        row.update(result, status="ok", ppl=ppl(model), eval_s=time.perf_counter() - te, sparsity=1 - kept / numel,
                   pruning_s=result["stats_s"] + result["solver_s"], peak_rss_mib=result["peak_rss_bytes"] / 2**20)
        model.load_state_dict(dense, strict=False)
        rows.append(row)
        partner = run_key([x for x in LIBRARIES if x != lib][0], method, pattern, seed)
        partner_masks = work / "runs" / f"{partner}.masks.npz"
        if partner in {run_key(r["library"], r["method"], r["pattern"], r["seed"]) for r in ok_rows(rows)} and partner_masks.exists():
            a, b = (masks, load_masks(partner_masks)) if lib == "sdsx" else (load_masks(partner_masks), masks)
            agreement[:] = [x for x in agreement if (x["method"], x["pattern"], x["seed"]) != (method, pattern, seed)]
            agreement.append(dict(method=method, pattern=pattern, seed=seed, **mask_agreement(a, b)))
        save()
        a = agreement_for(agreement, method, pattern, seed)
        print(f"{head}: wall {row['wall_s']:.1f} s (forward {row['forward_s']:.1f}, statistics {row['stats_s']:.1f}, solver "
              f"{row['solver_s']:.1f}, other {row['other_s']:.1f}), peak RSS {row['peak_rss_mib']:.0f} MiB, sparsity "
              f"{row['sparsity']:.4f}, ppl {row['ppl']:.2f}" + ("" if a is None else f", kept in common {a['common']:.2%}")
              + (f"; CHANGED outside the linears: {row['other_params_changed']}" if row["other_params_changed"] else ""), flush=True)

    md = to_markdown(meta, rows, agreement)
    print(md, flush=True)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    if args.plot:
        plot_ppl(rows, args.plot)
        print(f"plot: {args.plot}", flush=True)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
