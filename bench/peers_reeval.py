"""Re-evaluate the Wanda runs of a bench/peers.py work folder on more WikiText-2 windows, from their
saved masks (Wanda does not update the kept weights: the pruned model is the dense one times its
mask), for the noise figure at 64 windows without pruning again.

    python bench/peers_reeval.py --peers-json bench/results/peers/peers.json \\
        --work-dir ~/.cache/sdsx/peers/<settings> --max-windows 64 --json bench/results/peers/reeval64.json

It takes the run folder and the settings from the peers JSON, checks that each mask keeps the
pattern's share of weights, evaluates each Wanda run (both libraries, every seed) and reports, per
library and pattern, the mean and sample standard deviation over seeds at the old and new window
counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from pathlib import Path

import torch

import sdsx
from sdsx.data import load_text
from sdsx.data.calibration import encode
from sdsx.model.smollm2 import load_smollm2
from sdsx.pruners.spec import SparsitySpec

HERE = Path(__file__).resolve().parent


def _peers():
    spec = importlib.util.spec_from_file_location("bench_peers", HERE / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers-json", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, required=True, help="the peers settings folder holding runs/*.masks.npz")
    p.add_argument("--max-windows", type=int, default=64)
    p.add_argument("--libraries", default="sdsx,llmcompressor")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    peers = _peers()
    state = json.loads(args.peers_json.read_text())
    meta, settings = state["meta"], state["meta"]["settings"]
    rows = [r for r in peers.ok_rows(state["rows"]) if r["method"] == "wanda" and r["library"] in args.libraries.split(",")]
    if not rows:
        raise SystemExit(f"no Wanda runs of {args.libraries} in {args.peers_json}")
    model, tok = load_smollm2(meta.get("model_dir"))
    eval_ids = encode(tok, load_text(settings["wikitext"]))
    linears = peers._block_linears(model)
    dense = {n: m.weight.detach().clone() for n, m in linears.items()}
    out = []
    for r in rows:
        masks_path = args.work_dir / "runs" / f"{peers.run_key(r['library'], r['method'], r['pattern'], r['seed'])}.masks.npz"
        if not masks_path.exists():
            raise SystemExit(f"no masks for {r['library']} {r['pattern']} seed {r['seed']}: {masks_path} is missing")
        masks = peers.load_masks(masks_path)
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.size for m in masks.values())
        expected = 1.0 - SparsitySpec.parse(peers.sdsx_sparsity(r["pattern"])).sparsity
        if abs(kept - expected) > 0.01:
            raise SystemExit(f"{masks_path}: keeps {kept:.3f} of the weights, not the pattern's {expected:g}")
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(dense[n] * torch.from_numpy(masks[n]))
        ppl = sdsx.perplexity(model, eval_ids, seqlen=settings["eval_seqlen"], max_windows=args.max_windows, progress=False)
        out.append(dict(library=r["library"], pattern=r["pattern"], seed=r["seed"], ppl_old=r["ppl"], ppl=ppl, kept=kept))
        print(out[-1], flush=True)
    summary = []
    for lib in sorted({o["library"] for o in out}):
        for pattern in sorted({o["pattern"] for o in out}):
            mine = [o for o in out if (o["library"], o["pattern"]) == (lib, pattern)]
            if len(mine) < 2:
                continue
            old, new = [o["ppl_old"] for o in mine], [o["ppl"] for o in mine]
            summary.append(dict(library=lib, pattern=pattern, seeds=len(mine),
                                old_windows=settings["max_windows"], old_mean=statistics.fmean(old), old_sd=statistics.stdev(old),
                                new_windows=args.max_windows, new_mean=statistics.fmean(new), new_sd=statistics.stdev(new)))
            print(summary[-1], flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(source=str(args.peers_json), max_windows=args.max_windows, runs=out, summary=summary), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
