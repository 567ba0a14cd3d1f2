"""SDS and its base pruners against calibration size and source, from bench/sds.py result files.

    python bench/sds_calib.py bench/results/sds13/s0_sparsegpt_24_fast.json ... \
        --md bench/results/sds13/calib.md --plot bench/results/sds13/calib.png

Rows are grouped by calibration (source, tokens) and method; a row without perplexities (a
`--base-time-only` row) is skipped, and where two files hold the same method for the same
calibration and pattern, the later file on the command line wins. The table gives validation
(the speeches' held-out tail), other-text and WikiText-2 perplexity, and SDS's change against its
base on the same calibration. The plot: WikiText-2 perplexity against calibration tokens for the
speeches, and per source at the smallest size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = ("sparsegpt", "sds-sparsegpt", "wanda", "sds-wanda")
LABELS = {"sparsegpt": "SparseGPT", "sds-sparsegpt": "SDS-SparseGPT", "wanda": "Wanda", "sds-wanda": "SDS-Wanda"}


def source_label(calib: str) -> str:
    """A short name for a bench/sds.py --calib value."""
    if calib == "self":
        return "self-generated"
    names = []
    for part in calib.split(","):
        stem = Path(part).stem.lower()
        names.append("speeches" if stem.startswith("sotu") else "Brown" if stem.startswith("brown") else Path(part).name)
    return names[0] if len(names) == 1 else "mixed (" + " + ".join(names) + ")"


def collect(paths: list[Path]) -> dict[tuple[str, int, str], dict[str, dict]]:
    """{(source, tokens, pattern): {method: row}} over the files, later files winning."""
    out: dict[tuple[str, int, str], dict[str, dict]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        meta = data["meta"]
        source, tokens = source_label(meta["calib"]), int(meta["nsamples"]) * int(meta["seqlen"])
        for row in data["rows"]:
            if row["method"] not in METHODS or row.get("ppl") is None or row.get("options"):
                continue  # time-only rows, ablations with options
            entry = dict(row, file=path.name, other_tail=bool(meta.get("other_tail")))
            out.setdefault((source, tokens, str(row["pattern"])), {})[row["method"]] = entry
    return out


def _gain(sds: dict | None, base: dict | None, key: str) -> str:
    if not sds or not base or sds.get(key) is None or base.get(key) is None:
        return ""
    return f" ({(sds[key] / base[key] - 1) * 100:+.1f}%)"


def to_markdown(groups: dict[tuple[str, int, str], dict[str, dict]]) -> str:
    lines = [
        "SmolLM2-135M, seed 0. Validation: the last 15% of the speeches (32 windows of 512); other: Brown, 32 "
        "windows (spread over all of it, or over its last 15% where Brown is calibrated on: marked *); "
        "WikiText-2 test: 64 windows of 512. SDS's change is against its base on the same calibration.",
        "",
        "| calibration | tokens | pattern | method | validation | other | WikiText-2 | file |",
        "|---|---:|---|---|---:|---:|---:|---|",
    ]
    for (source, tokens, pattern), rows in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0] != "speeches", kv[0][0], kv[0][1])):
        for method in METHODS:
            r = rows.get(method)
            if r is None:
                continue
            base = rows.get(method.removeprefix("sds-")) if method.startswith("sds-") else None
            star = "*" if r["other_tail"] else ""
            lines.append(
                f"| {source} | {tokens:,} | {pattern} | {LABELS[method]} | {r.get('ppl_val', float('nan')):.2f}{_gain(r, base, 'ppl_val')} | "
                f"{r.get('ppl_other', float('nan')):.2f}{star}{_gain(r, base, 'ppl_other')} | {r['ppl']:.2f}{_gain(r, base, 'ppl')} | {r['file']} |"
            )
    return "\n".join(lines) + "\n"


def plot(groups: dict[tuple[str, int, str], dict[str, dict]], out: Path, pattern: str = "2:4") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"sparsegpt": ("C0", "--"), "sds-sparsegpt": ("C0", "-"), "wanda": ("C1", "--"), "sds-wanda": ("C1", "-")}
    sizes = sorted(t for (s, t, p) in groups if s == "speeches" and p == pattern)
    for method in METHODS:
        pts = [(t, groups[("speeches", t, pattern)][method]["ppl"]) for t in sizes if method in groups[("speeches", t, pattern)]]
        if pts:
            color, ls = styles[method]
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", color=color, label=LABELS[method])
    ax1.set_xscale("log")
    ax1.set_xticks(sizes, [f"{t // 1000}k" for t in sizes])
    ax1.minorticks_off()
    ax1.set_xlabel("calibration tokens (speeches, log scale)")
    ax1.set_ylabel("WikiText-2 perplexity")
    ax1.set_title(f"{pattern}: calibration size")
    ax1.legend()
    smallest = min((t for (_, t, p) in groups if p == pattern), default=None)
    sources = sorted({s for (s, t, p) in groups if t == smallest and p == pattern}, key=lambda s: (s != "speeches", s))
    width = 0.2
    for i, method in enumerate(METHODS):
        vals = [groups[(s, smallest, pattern)].get(method, {}).get("ppl", float("nan")) for s in sources]
        color, ls = styles[method]
        ax2.bar([j + (i - 1.5) * width for j in range(len(sources))], vals, width, color=color,
                alpha=1.0 if method.startswith("sds-") else 0.45, label=LABELS[method])
    ax2.set_xticks(range(len(sources)), [src.replace("mixed (", "mixed\n(") for src in sources])
    ax2.set_ylabel("WikiText-2 perplexity")
    ax2.set_title(f"{pattern}: calibration source ({smallest:,} tokens)" if smallest else pattern)
    tallest = max((r["ppl"] for src in sources for r in groups[(src, smallest, pattern)].values()), default=None)
    if tallest:
        ax2.set_ylim(0, 1.25 * tallest)  # room for the legend above the bars
    ax2.legend(ncol=2, loc="upper center")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--pattern", default="2:4", help="the pattern the plot shows")
    args = p.parse_args(argv)
    groups = collect(args.results)
    md = to_markdown(groups)
    print(md)
    if args.md:
        args.md.write_text(md)
    if args.plot:
        plot(groups, args.plot, args.pattern)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
