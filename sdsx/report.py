"""Run reports: ``report.json``, ``report.md`` and PNG plots (weight histograms per SDS phase, the
paper's Figure 1; per-layer reconstruction error by method; sparsity per layer).

Plots are drawn with matplotlib's object API on an Agg canvas, so they need no display and do not
change the backend of a running pyplot session.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger("sdsx")

__all__ = [
    "format_table",
    "plot_errors",
    "plot_histograms",
    "plot_phase_errors",
    "plot_sparsity",
    "report_dict",
    "write_report",
    "zeroshot_table",
]

PHASE_TITLES = {
    "dense": "dense (before pruning)",
    "sparse": "sparse (phase 1: one-shot pruning)",
    "redense": "re-dense (phase 2: sparse-regularized reconstruction)",
    "final": "final (phase 3: pruned again and adjusted)",
}


# ---------------------------------------------------------------------------------------- tables
def _fmt(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else str(value)
    if isinstance(value, int):
        return str(value)
    if "acc" in key:
        return f"{value:.4f}"
    if key.endswith(" s"):
        return f"{value:.1f}"
    if abs(value) >= 1000:
        return f"{value:.1f}"
    return f"{value:.3f}"


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, right: Sequence[str] = ()
) -> str:
    """A markdown table of ``rows`` (dicts); columns in first-seen order unless given.
    Accuracies get 4 decimals, perplexities 3, seconds 1; numeric columns (and those named in
    ``right``) are right-aligned."""
    if not rows:
        return ""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [c in right or all(_is_num(r.get(c)) for r in rows if r.get(c) is not None) for c in columns]
    head = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    body = ["| " + " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)) + " |" for row in cells]
    return "\n".join([head, rule, *body])


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def zeroshot_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """lm-eval-style table of :func:`sdsx.eval.zeroshot.zero_shot` results: task, n, metric,
    value, standard error (and chance level)."""
    rows = []
    for task, res in results.items():
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric in res:
                rows.append({
                    "task": task, "n": res.get("n"), "metric": metric, "value": res[metric],
                    "stderr": res.get(f"{metric}_stderr"), "chance": res.get("chance") if metric != "perplexity" else None,
                })
    # one rule (4 decimals) for every number of this table
    return format_table([{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                        ["task", "n", "metric", "value", "stderr", "chance"], right=("value", "stderr", "chance"))


# ------------------------------------------------------------------------------------ report data
def report_dict(report: Any) -> dict[str, Any]:
    """A report as a plain dict: a PruneReport/SDSReport (``to_dict()``) or a dict already."""
    if isinstance(report, Mapping):
        return dict(report)
    if hasattr(report, "to_dict"):
        return report.to_dict()
    raise TypeError(f"expected a PruneReport or a dict, got {type(report).__name__}")


def _label(rep: Mapping[str, Any]) -> str:
    return f"{rep.get('method', '?')} {rep.get('sparsity', '')}".strip()


def _json_safe(value: Any) -> Any:
    from sdsx.io import json_safe

    return json_safe(value)


_BLOCK = re.compile(r"\.(\d+)\.")


def _block_of(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def _short_layer(name: str) -> str:
    """"model.layers.3.self_attn.q_proj" -> "3.q_proj"."""
    b = _block_of(name)
    return f"{b}.{name.rsplit('.', 1)[-1]}" if b is not None else name


# ----------------------------------------------------------------------------------------- plots
def _figure(width: float = 10.0, height: float = 4.8):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or sdsx[plots])") from None
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _block_ticks(ax: Any, names: Sequence[str]) -> None:
    """x ticks at the first layer of every few blocks, labelled with the block index."""
    starts: list[tuple[int, int]] = []
    for i, n in enumerate(names):
        b = _block_of(n)
        if b is not None and (not starts or starts[-1][1] != b):
            starts.append((i, b))
    if not starts:
        return
    step = max(1, math.ceil(len(starts) / 15))
    shown = starts[::step]
    ax.set_xticks([i for i, _ in shown])
    ax.set_xticklabels([str(b) for _, b in shown])
    for i, _ in starts[1:]:
        ax.axvline(i - 0.5, color="0.9", linewidth=0.6, zorder=0)


def plot_histograms(report: Any, path: str | os.PathLike) -> Path | None:
    """The paper's Figure 1 for one layer: its weight distribution after each SDS phase (dense,
    sparse, re-dense, final), counts on a log scale over shared bins. None when the report holds
    no histograms (not an SDS run)."""
    rep = report_dict(report)
    hist = rep.get("histograms") or {}
    counts = hist.get("counts") or {}
    edges = hist.get("edges")
    phases = [p for p in PHASE_TITLES if p in counts] + [p for p in counts if p not in PHASE_TITLES]
    if not phases or not edges:
        return None
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = (edges[-1] - edges[0]) / max(len(centers), 1)
    cols = 2 if len(phases) > 1 else 1
    rows = math.ceil(len(phases) / cols)
    fig = _figure(11.0, 3.4 * rows + 0.8)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    for k, phase in enumerate(phases):
        ax = axes[k // cols][k % cols]
        c = counts[phase]
        total = sum(c)
        zero_bin = min(range(len(centers)), key=lambda i: abs(centers[i]))
        ax.bar(centers, [max(v, 0) for v in c], width=width, color=colors[k % len(colors)], linewidth=0)
        ax.set_yscale("log")
        ax.set_title(PHASE_TITLES.get(phase, phase), fontsize=10)
        ax.text(0.98, 0.95, f"{total:,} weights\n{c[zero_bin] / total:.1%} in the bin at 0" if total else "",
                transform=ax.transAxes, ha="right", va="top", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        if k // cols == rows - 1:
            ax.set_xlabel("weight value")
        if k % cols == 0:
            ax.set_ylabel("count (log scale)")
    for k in range(len(phases), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    layer = rep.get("histogram_layer") or "one layer"
    fig.suptitle(f"Weight distribution of {layer} after each phase ({_label(rep)})", fontsize=11)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


def _layers(rep: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(rep.get("layers") or [])


def plot_errors(reports: Iterable[Any], path: str | os.PathLike) -> Path | None:
    """Per-layer reconstruction error tr(D H D^T) on the calibration inputs, one line per run
    (method and sparsity), log scale, layers in model order. None when no run has errors."""
    reps = [report_dict(r) for r in reports]
    series = []
    for rep in reps:
        names = [str(l["name"]) for l in _layers(rep)]
        errs = [l.get("error") for l in _layers(rep)]
        vals = [float(e) if isinstance(e, (int, float)) and math.isfinite(e) and e > 0 else float("nan") for e in errs]
        if names and any(not math.isnan(v) for v in vals):
            series.append((_label(rep), names, vals))
    if not series:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, names, vals in series:
        ax.plot(range(len(vals)), vals, marker=".", markersize=3, linewidth=0.9, label=label)
    ax.set_yscale("log")
    _block_ticks(ax, series[0][1])
    ax.set_xlabel("decoder block (linear layers in model order)")
    ax.set_ylabel("reconstruction error tr(D H D^T) (log scale)")
    ax.set_title("Per-layer reconstruction error on the calibration inputs, by method")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


def plot_phase_errors(report: Any, path: str | os.PathLike) -> Path | None:
    """An SDS run's per-layer error after each phase (phase 1's pruning, the second pruning, the
    adjustment, the final choice), log scale. None when the report has no phase errors."""
    rep = report_dict(report)
    phase_errors = rep.get("phase_errors") or {}
    if not phase_errors:
        return None
    names = list(phase_errors)
    phases = [p for p in ("sparse", "sparse2", "adjust", "final") if any(p in e for e in phase_errors.values())]
    labels = {"sparse": "phase 1: one-shot pruning", "sparse2": "phase 3: pruned again", "adjust": "phase 3: adjusted", "final": "final (kept)"}
    fig = _figure(10.0, 7.0)
    ax, ratio_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for p in phases:
        vals = [phase_errors[n].get(p) for n in names]
        vals = [float(v) if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else float("nan") for v in vals]
        ax.plot(range(len(vals)), vals, marker=".", markersize=3, linewidth=0.9, label=labels.get(p, p),
                linestyle="--" if p == "final" else "-")
    ax.set_yscale("log")
    ax.set_ylabel("reconstruction error (log scale)")
    ax.set_title(f"SDS per-layer error after each phase ({_label(rep)})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    # the change SDS made to each layer, readable where the curves above overlap
    ratios = []
    for n in names:
        first, final = phase_errors[n].get("sparse"), phase_errors[n].get("final")
        ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (first, final)) and first > 0
        ratios.append(final / first if ok else float("nan"))
    ratio_ax.plot(range(len(ratios)), ratios, marker=".", markersize=3, linewidth=0.8, color="#c44e52")
    ratio_ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
    ratio_ax.set_ylabel("final / phase 1 error")
    ratio_ax.set_xlabel("decoder block (linear layers in model order)")
    ratio_ax.grid(True, axis="y", alpha=0.3)
    _block_ticks(ratio_ax, names)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


def plot_sparsity(reports: Iterable[Any], path: str | os.PathLike) -> Path | None:
    """Fraction of zeros per layer, one marker series per run. None when no run has layers."""
    reps = [report_dict(r) for r in reports]
    series = [(_label(r), [str(l["name"]) for l in _layers(r)], [float(l["sparsity"]) for l in _layers(r)]) for r in reps if _layers(r)]
    if not series:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    markers = "os^vD<>"
    for k, (label, names, vals) in enumerate(series):
        ax.plot(range(len(vals)), vals, marker=markers[k % len(markers)], markersize=3, linewidth=0.6, label=label, alpha=0.85)
    _block_ticks(ax, series[0][1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("decoder block (linear layers in model order)")
    ax.set_ylabel("fraction of weights pruned")
    ax.set_title("Sparsity per layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


# ---------------------------------------------------------------------------------------- report
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def write_report(
    out_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]] = (),
    reports: Sequence[Any] = (),
    meta: Mapping[str, Any] | None = None,
    title: str = "sdsx report",
    zeroshot: Mapping[str, Mapping[str, Any]] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out_dir`` (created).

    Args:
        out_dir: the report folder; files of an earlier report there are replaced.
        rows: the results table, one dict per model/method (see :func:`format_table`).
        reports: PruneReport / SDSReport objects (or their ``to_dict()``), one per pruning run.
        meta: anything else to record (command, calibration, evaluation settings).
        title: the report's heading.
        zeroshot: a :func:`~sdsx.eval.zeroshot.zero_shot` result to tabulate with standard errors.
        plots: draw the PNGs (skipped with a warning when matplotlib is missing).
    Returns:
        {"json", "md", and one key per plot written: "errors", "sparsity", "histograms_<run>",
        "phases_<run>"} -> path.
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    reps = [report_dict(r) for r in reports]
    written: dict[str, Path] = {}

    if plots and reps:
        try:
            p = plot_errors(reps, out / "layer_errors.png")
            if p:
                written["errors"] = p
            p = plot_sparsity(reps, out / "sparsity.png")
            if p:
                written["sparsity"] = p
            for rep in reps:
                tag = _slug(_label(rep).replace(":", "_").replace(" ", "-"))
                p = plot_histograms(rep, out / f"histograms_{tag}.png")
                if p:
                    written[f"histograms_{tag}"] = p
                p = plot_phase_errors(rep, out / f"phase_errors_{tag}.png")
                if p:
                    written[f"phases_{tag}"] = p
        except ImportError as exc:
            log.warning("report: %s; the PNG plots were skipped", exc)

    record = {
        "title": title,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": [dict(r) for r in rows],
        "zeroshot": {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in (zeroshot or {}).items()},
        "runs": reps,
        "meta": dict(meta or {}),
        "plots": {k: p.name for k, p in written.items()},
    }
    jpath = out / "report.json"
    jpath.write_text(json.dumps(_json_safe(record), indent=1) + "\n", encoding="utf-8")

    md = [f"# {title}", "", f"Written {record['created']}.", ""]
    if rows:
        md += ["## Results", "", format_table(rows), ""]
    if zeroshot:
        md += ["## Zero-shot", "", zeroshot_table(zeroshot), ""]
    if written:
        md += ["## Plots", ""]
        md += [f"![{k}]({p.name})" for k, p in written.items()]
        md += [""]
    for obj, rep in zip(reports, reps):
        md += [f"## {_label(rep)}", ""]
        if hasattr(obj, "to_markdown"):
            md += [obj.to_markdown(per_layer=True), ""]
        else:
            md += [_markdown_from_dict(rep), ""]
    if meta:
        md += ["## Settings", "", "```json", json.dumps(_json_safe(dict(meta)), indent=1), "```", ""]
    mpath = out / "report.md"
    mpath.write_text("\n".join(md), encoding="utf-8")
    written = {"json": jpath, "md": mpath, **written}
    log.info("report written to %s (%d plots)", out, len(written) - 2)
    return written


def _markdown_from_dict(rep: Mapping[str, Any]) -> str:
    layers = _layers(rep)
    lines = [
        f"**{_label(rep)}**: {len(layers)} layers, overall sparsity {rep.get('overall_sparsity', float('nan')):.2%}, "
        f"total error {_fmt('error', rep.get('total_error'))}, calibration {rep.get('nsamples')} sequences / {rep.get('tokens')} tokens",
    ]
    if layers:
        lines += ["", "| layer | shape | sparsity | error |", "|---|---|---:|---:|"]
        for l in layers:
            shape = "x".join(str(s) for s in l.get("shape", []))
            lines.append(f"| {l['name']} | {shape} | {float(l['sparsity']):.4f} | {_fmt('error', l.get('error'))} |")
    return "\n".join(lines)
