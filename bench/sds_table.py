"""One table from several bench/sds.py result files: every method's perplexities next to its base
pruner's from the same calibration (the same seed and pattern), with the relative change.

    python bench/sds_table.py bench/results/sds13/*_fit.json bench/results/sds13/probe_fit_s0.json --md bench/results/sds13/table.md

Rows of the same (seed, pattern, method) from several files are all listed (they are repeats);
the base of a row is the first base row of its seed and pattern, preferring one from its own file.
`--seeds` adds a summary over calibration seeds: for every pattern and base pruner, the default
SDS's change against its base per seed (paired: the same windows) and its mean and sample SD (the
last default-SDS row of a seed counts, in the order the files are given).
Time ratios are given only against a base of the same file (measured side by side in one run):
against the base row's own run (with the validation windows) and, where the file has it, against
the base as a user runs it by default (``plain_seconds``: all windows, no validation stream).

Rows scored with `bench/sds.py --zeroshot` get a column per zero-shot task: accuracy ± standard
error in points, and for a row with a base (the same pairing as the perplexities) the difference
from the base in points and McNemar's exact p-value over the items (the two rows' per-item
"correct" strings; only when both hold the same items). `--seeds` adds a zero-shot table as well:
per seed the change and its p-value, and the mean change over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = (("ppl_val", "validation"), ("ppl_other", "Brown"), ("ppl", "WikiText-2"))


def mcnemar(a: str, b: str) -> tuple[float, float]:
    """McNemar's exact test of two classifiers on the same items.

    ``a`` and ``b`` hold one character per item, '1' where it was answered right, '0' where not.
    Returns (accuracy of a - accuracy of b, as a fraction; two-sided p-value): the exact binomial
    test of the discordant items (right in one, wrong in the other), which are split 50/50 under
    the null hypothesis: p = min(1, 2 * P[X <= min(n01, n10)]), X ~ Binomial(n01 + n10, 1/2);
    p = 1 when no item is discordant.

    Raises:
        ValueError: strings of different lengths, empty, or with characters other than '0'/'1'.
    """
    if len(a) != len(b):
        raise ValueError(f"the two rows hold different items: {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no items")
    if set(a) - {"0", "1"} or set(b) - {"0", "1"}:
        raise ValueError("correct strings hold only '0' and '1'")
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    n = only_a + only_b
    k = min(only_a, only_b)
    tail, term = 0, 1  # sum of C(n, i) for i <= k, in exact integers
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    p = min(1.0, 2 * tail / 2**n)
    return (only_a - only_b) / len(a), p


def zeroshot_tasks(rows: list[dict]) -> list[str]:
    """The zero-shot tasks of any row, in order of first appearance."""
    return list(dict.fromkeys(t for r in rows for t in (r.get("zeroshot") or {})))


def zeroshot_pair(row: dict, base: dict | None, task: str) -> tuple[float, float] | None:
    """(difference in points, McNemar p) of ``row`` against ``base`` on ``task``, or None where
    either lacks the task or they hold different items."""
    if base is None or base is row:
        return None
    z, zb = (row.get("zeroshot") or {}).get(task), (base.get("zeroshot") or {}).get(task)
    if not z or not zb or not z.get("correct") or len(z["correct"]) != len(zb.get("correct") or ""):
        return None
    diff, p = mcnemar(z["correct"], zb["correct"])
    return 100 * diff, p


def _p(p: float) -> str:
    return f"p={p:.2g}" if p >= 1e-3 else f"p={p:.1e}"


def zeroshot_cell(row: dict, base: dict | None, task: str) -> str:
    """"acc ± stderr" in points, with "(difference, p)" against the base where paired."""
    z = (row.get("zeroshot") or {}).get(task)
    if not z:
        return ""
    se = z.get("acc_stderr")
    cell = f"{100 * z['acc']:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")
    pair = zeroshot_pair(row, base, task)
    if pair is not None:
        cell += f" ({pair[0]:+.1f}, {_p(pair[1])})"
    return cell


def load(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        data = json.loads(path.read_text())
        for row in data["rows"]:
            rows.append(dict(row, seed=data["meta"].get("seed", 0), model=data["meta"].get("model", "SmolLM2-135M"), file=path.name))
    return rows


def base_of(row: dict, rows: list[dict], timed: bool = False) -> dict | None:
    """The base row of ``row``: the same seed and pattern, preferring its own file. For the
    perplexities a timing-only base row (``--base-time-only``) does not count; for the time
    (``timed``) only a base of the same file does."""
    pruner = row["method"].split("-", 1)[-1]
    same = [r for r in rows if r["method"] == pruner and r["pattern"] == row["pattern"] and r["seed"] == row["seed"]
            and r.get("model") == row.get("model")]
    own = [r for r in same if r["file"] == row["file"]]
    if timed:
        return (own or [None])[0]
    scored = [r for r in own + same if not r.get("time_only")]
    return (scored or [None])[0]


def to_markdown(rows: list[dict]) -> str:
    tasks = zeroshot_tasks(rows)
    head = ["model", "seed", "pattern", "method", "options"] + [name for _, name in METRICS] + [f"{t} acc" for t in tasks]
    head += ["time vs base", "vs default base", "file"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 5 + "---:|" * (len(METRICS) + len(tasks) + 2) + "---|"]
    order = sorted(rows, key=lambda r: (r.get("model", ""), str(r["pattern"]), r["method"].split("-", 1)[-1], r["seed"],
                                        r["method"] != r["method"].split("-", 1)[-1]))
    for r in order:
        b = base_of(r, rows)
        t = base_of(r, rows, timed=True)
        cells = []
        for key, _ in METRICS:
            if key not in r:
                cells.append("" if not r.get("time_only") else "(timing only)")
            elif b is None or b is r or key not in b:
                cells.append(f"{r[key]:.2f}")
            else:
                cells.append(f"{r[key]:.2f} ({100 * (r[key] / b[key] - 1):+.1f}%)")
        cells += [zeroshot_cell(r, b, t) for t in tasks]
        # time ratios only side by side in one run (one file): the machine's load drifts between runs
        same_run = t is not None and t is not r and r.get("seconds")
        ratio = f"{r['seconds'] / t['seconds']:.2f}x" if same_run and t.get("seconds") else ""
        # against the base run as a user runs it (all windows, default statistics, no validation stream)
        plain = f"{r['seconds'] / t['plain_seconds']:.2f}x" if same_run and t.get("plain_seconds") else ""
        opts = ",".join(f"{k}={v}" for k, v in (r.get("options") or {}).items())
        lines.append(f"| {r.get('model', '')} | {r['seed']} | {r['pattern']} | {r['method']} | {opts} | " + " | ".join(cells) + f" | {ratio} | {plain} | {r['file']} |")
    return "\n".join(lines) + "\n"


def seed_summary(rows: list[dict]) -> list[dict]:
    """Per (pattern, pruner): the default SDS against its base, paired per seed, over the seeds."""
    latest: dict[tuple, dict] = {}
    for r in rows:  # the last default-SDS row of each (pattern, method, seed)
        if r["method"].startswith("sds-") and not r.get("options") and "ppl" in r:
            latest[(r.get("model", ""), str(r["pattern"]), r["method"], r["seed"])] = r
    out = []
    for (model, pattern, method), group in sorted(_group(latest).items()):
        entry = dict(model=model, pattern=pattern, method=method, seeds=[], metrics={})
        for r in sorted(group, key=lambda r: r["seed"]):
            b = base_of(r, rows)  # a base pruner's row, never r itself
            if b is None:
                continue
            entry["seeds"].append(r["seed"])
            for key, _ in METRICS:
                if key in r and key in b:
                    m = entry["metrics"].setdefault(key, dict(base=[], sds=[], change=[]))
                    m["base"].append(b[key])
                    m["sds"].append(r[key])
                    m["change"].append(100 * (r[key] / b[key] - 1))
            for task in zeroshot_tasks([r]):
                pair = zeroshot_pair(r, b, task)
                if pair is not None:
                    z = entry.setdefault("zeroshot", {}).setdefault(task, {"seeds": [], "base": [], "sds": [], "change": [], "p": []})
                    z["seeds"].append(r["seed"])
                    z["base"].append(100 * b["zeroshot"][task]["acc"])
                    z["sds"].append(100 * r["zeroshot"][task]["acc"])
                    z["change"].append(pair[0])
                    z["p"].append(pair[1])
        if entry["seeds"]:
            out.append(entry)
    return out


def _group(latest: dict[tuple, dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for (model, pattern, method, _), r in latest.items():
        groups.setdefault((model, pattern, method), []).append(r)
    return groups


def _mean_sd(values: list[float], digits: int = 2, unit: str = "") -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return f"{statistics.mean(values):.{digits}f}{unit} ± {statistics.stdev(values):.{digits}f}{unit}"


def seeds_markdown(summary: list[dict]) -> str:
    head = ["model", "pattern", "method", "seeds"]
    for _, name in METRICS:
        head += [f"{name}: base", f"{name}: SDS", f"{name}: change per seed", f"{name}: mean change"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + ("---:|" * 4) * len(METRICS)]
    for e in summary:
        cells = [e.get("model", ""), e["pattern"], e["method"], ",".join(str(s) for s in e["seeds"])]
        for key, _ in METRICS:
            m = e["metrics"].get(key)
            if m is None:
                cells += [""] * 4
                continue
            cells += [_mean_sd(m["base"]), _mean_sd(m["sds"]), ", ".join(f"{c:+.1f}%" for c in m["change"]),
                      _mean_sd(m["change"], 1, "%")]
        lines.append("| " + " | ".join(cells) + " |")
    zs = [(e, task, z) for e in summary for task, z in (e.get("zeroshot") or {}).items()]
    if zs:
        lines += ["", "Zero-shot accuracy (points), the default SDS against its base per seed (McNemar's exact test per seed):", "",
                  "| model | pattern | method | task | seeds | base | SDS | change per seed (p) | mean change |",
                  "|---|---|---|---|---|---:|---:|---:|---:|"]
        for e, task, z in zs:
            per_seed = ", ".join(f"{c:+.1f} ({_p(p)})" for c, p in zip(z["change"], z["p"]))
            lines.append(f"| {e.get('model', '')} | {e['pattern']} | {e['method']} | {task} | {','.join(str(s) for s in z['seeds'])} | "
                         f"{_mean_sd(z['base'], 1)} | {_mean_sd(z['sds'], 1)} | {per_seed} | {_mean_sd(z['change'], 1)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--seeds", action="store_true", help="add the summary over calibration seeds")
    args = p.parse_args(argv)
    rows = load(args.results)
    md = to_markdown(rows)
    if args.seeds:
        md += "\n" + seeds_markdown(seed_summary(rows))
    print(md)
    if args.md:
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
