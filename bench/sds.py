"""SDS against its base pruner on SmolLM2-135M or Gemma-3-270M (--model), side by side in one run.

    python bench/sds.py [--patterns 2:4,0.5] [--pruners sparsegpt,wanda] [--nsamples 32 --seqlen 512]
                        [--max-windows 64] [--set l1=0.1 --set dense_iters=20 ...] [--variants ...]
                        [--json bench/results/sds.json] [--md bench/results/sds.md]

For every pruner x pattern it prunes a fresh copy of the model with the base pruner and with SDS
(same calibration), and reports WikiText-2 test perplexity (512-token windows) and wall time.
`--variants` adds ablations: named option sets, e.g. `nodense:redense=False` or
`l1x4:l1=0.4`. `--ops` also times prox_step against its reference and the Gram path of the
re-dense phase against the token path on one SmolLM2 layer. `--resume` keeps the rows a killed
run already wrote to `--json` (same settings) and runs only the missing ones, for the long
calibration-size runs (e.g. `--nsamples 128`, `--nsamples 512`); with `--checkpoint-root` a killed
run also goes on inside the row it was in (sdsx's block checkpoints), not only from the next row.
`--calib a.txt,b.txt` or `--calib self` compares calibration sources (`--quality-only`).
`--zeroshot piqa,arc_easy,lambada_openai [--zs-limit N]` also scores every row (the dense one too)
on zero-shot tasks (sdsx.eval.zeroshot, lm-eval 0.4's protocol), keeping per item whether it was
answered right so that bench/sds_table.py can test SDS against its base pair by pair (McNemar).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

import sdsx
from sdsx.data.paths import data_root
from sdsx.defaults import auto_validation
from sdsx.pruners.sds import SDSOptions, objective, redense, redense_tokens, regularizer_scale

REPO = Path(__file__).resolve().parents[1]
DATA = data_root() or REPO.parent / "shared" / "data"  # $SDSX_DATA first, like the CLI


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, val = item.partition("=")
        out[key.strip()] = _value(val.strip())
    return out


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    return name, parse_sets([s for s in rest.split(",") if s])


def ops_bench(model, calib, threads: int, samples: int = 32) -> dict:
    """prox_step vs reference, and Gram vs token re-dense on the first MLP down projection, on the
    first ``samples`` calibration sequences (default all of the usual 32 x 512 tokens)."""
    from sdsx import ops
    from sdsx.ops import reference as ref

    layer = model.model.layers[0].mlp.down_proj
    captured = []
    h = layer.register_forward_hook(lambda m, i, o: captured.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for start_row in range(0, min(samples, len(calib)), 8):
            model(calib[start_row : min(start_row + 8, samples)])
    h.remove()
    X = torch.cat(captured).float()
    W_d = layer.weight.detach().float()
    H = X.t() @ X / X.shape[0]
    start = W_d * ops.nm_mask(W_d.abs(), 2, 4)
    l1a, l2a = regularizer_scale(W_d, H, 0.1, 0.1)
    out: dict = {"layer": "model.layers.0.mlp.down_proj", "shape": list(W_d.shape), "tokens": X.shape[0]}

    def timed(fn, reps=3):
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            res = fn()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3, res

    Y, Wp, G = W_d.clone(), W_d * 0.9, W_d * 0.01
    out["prox_step_ref_ms"], _ = timed(lambda: ref.prox_step(Y, Wp, G, 0.1, 0.01, 0.01, 0.5, None))
    out["prox_step_ms"], _ = timed(lambda: ops.prox_step(Y, Wp, G, 0.1, 0.01, 0.01, 0.5, None))
    out["prox_step_speedup"] = out["prox_step_ref_ms"] / out["prox_step_ms"]
    iters = 20
    out["gram_ms"], Wg = timed(lambda: redense(start, W_d, H, l1a, l2a, iters), 1)
    out["gram_objective"] = objective(Wg, W_d, H, l1a, l2a)
    # the token path: same objective, same iterations (first), then as many as it needs to reach it
    out["token_ms"], Wt = timed(lambda: redense_tokens(start, W_d, X, l1a, l2a, iters), 1)
    out["token_objective"] = objective(Wt, W_d, H, l1a, l2a)
    out["token_vs_gram_time"] = out["token_ms"] / out["gram_ms"]
    out["start_objective"] = objective(start, W_d, H, l1a, l2a)
    # the fewest Gram (FISTA) iterations that reach the token path's 20-iteration objective
    for k in range(1, iters + 1):
        ms, Wk = timed(lambda: redense(start, W_d, H, l1a, l2a, k), 1)
        if objective(Wk, W_d, H, l1a, l2a) <= out["token_objective"]:
            out["gram_iters_to_token_objective"] = k
            out["gram_ms_to_token_objective"] = ms
            out["gram_time_fraction_of_token"] = ms / out["token_ms"]
            break
    return out


MODELS = {"smollm2-135m": ("SmolLM2-135M", "never"), "gemma3-270m": ("Gemma-3-270M", "auto")}


def uses_bos(args, tok) -> bool:
    """Whether evaluation windows start with their own BOS (Gemma's protocol)."""
    from sdsx.data.bos import bos_id

    return bos_id(tok, args.bos) is not None


def zeroshot_scores(model, tok, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                    data_dir=None) -> dict:
    """Zero-shot accuracy of ``model`` as a result row keeps it: per task "acc", "acc_stderr", "n",
    "acc_norm" and "acc_norm_stderr" (multiple-choice tasks), "perplexity" (LAMBADA), and
    "correct": one character per item, '1' where it was answered right (the prediction is the gold
    choice; for LAMBADA the greedy decoding gives the word), else '0', for paired tests.

    The prefix token is zero_shot's bos="auto" whatever --bos says: BOS when the tokenizer starts
    texts with it (Gemma: yes, SmolLM2: no), lm-eval 0.4's default, so the numbers stay comparable
    with lm-eval's whichever window protocol the perplexities use.
    """
    from sdsx.eval.zeroshot import zero_shot

    results = zero_shot(model, tok, tasks, data_dir=data_dir, limit=limit, batch_size=batch_size, progress=False,
                        bos="auto", log_samples=True)
    out = {}
    for task, r in results.items():
        if r["kind"] == "greedy":
            hits = [s["greedy"] for s in r["samples"]]
        else:
            hits = [s["pred"] == s["gold"] for s in r["samples"]]
        entry = {"acc": r["acc"], "acc_stderr": r["acc_stderr"], "n": r["n"]}
        for k in ("acc_norm", "acc_norm_stderr", "perplexity"):
            if k in r:
                entry[k] = r[k]
        entry["correct"] = "".join("1" if h else "0" for h in hits)
        out[task] = entry
    return out


def build_texts(args, model, tok) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict]:
    """The calibration windows, the validation token stream and the other text's windows.

    Every text that is both a calibration source and an evaluation text (validation, other) is
    split at 1 - holdout: calibration windows from the head, evaluation from the tail, so that no
    evaluated token was calibrated on. One text file as --calib is the old protocol exactly (its
    windows from its head with `seed`, the validation from its tail).
    """
    from sdsx.data import load_text
    from sdsx.data.calibration import encode, held_out
    from sdsx.data.sources import SELF, calibration_from, mixed_calibration

    def same(a: str | None, b: str | None) -> bool:
        return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()

    sources = [] if args.calib == SELF else [s.strip() for s in args.calib.split(",") if s.strip()]
    val_text = args.val_text or (sources[0] if len(sources) == 1 else str(DATA / "calib" / "sotu_1990_2021.txt"))
    held = args.holdout > 0
    if args.calib == SELF or not held:
        # nothing to keep apart: the library's own reading of a --calib string (self, a,b or one file)
        calib = calibration_from(args.calib, tok, model=model, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, bos=args.bos)
    else:
        # SmolLM2's protocol: one token stream, no BOS per window (--bos never); Gemma's: a BOS per window
        cut = [args.holdout if same(src, val_text) or same(src, args.other) else 0.0 for src in sources]
        calib = mixed_calibration(sources, tok, args.nsamples, args.seqlen, args.seed, bos=args.bos, holdout=cut)
    val_ids = held_out(val_text, tok, args.holdout, bos=args.bos) if held else None
    other_ids, other_tail = None, False
    if args.other:
        other_tail = held and any(same(src, args.other) for src in sources)
        if other_tail:
            oids = held_out(args.other, tok, args.holdout, bos=args.bos)
        else:
            oids = encode(tok, load_text(args.other), special_tokens=not uses_bos(args, tok))
        # with a BOS per window, perplexity() cuts slices of eval_seqlen - 1 text tokens
        width = args.eval_seqlen - (1 if uses_bos(args, tok) else 0)
        step = oids.numel() // args.val_windows
        other_ids = torch.cat([oids[i * step : i * step + width] for i in range(args.val_windows)])
    return calib, val_ids, other_ids, dict(val_text=val_text, other_tail=other_tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS),
                   help="the offline model: SmolLM2-135M (default) or Gemma-3-270M (PyPI packages, see sdsx.model.gemma3)")
    p.add_argument("--bos", default=None, choices=("auto", "always", "never"),
                   help="how windows start: default 'never' for SmolLM2 (one token stream, the results so far), "
                        "'auto' for Gemma (a BOS per window, which Gemma needs)")
    p.add_argument("--patterns", default="2:4,0.5")
    p.add_argument("--pruners", default="sparsegpt,wanda")
    p.add_argument("--calib", default=str(DATA / "calib" / "sotu_1990_2021.txt"),
                   help="calibration: a text file, several (a.txt,b.txt: the windows split evenly, source i drawn "
                        "with seed + i), or `self` (sampled from the dense model, cached). A source that is also "
                        "the validation or the other text gives windows only from its first 1 - holdout")
    p.add_argument("--val-text", default=None,
                   help="the text whose last `holdout` fraction is the validation text (default: --calib when it "
                        "is one file, else the speeches)")
    p.add_argument("--wikitext", default=str(DATA / "wikitext2" / "wiki.test.raw"))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=64, help="WikiText-2 windows evaluated (64 x 512 = 32k tokens)")
    p.add_argument("--schedule", default="interleaved")
    p.add_argument("--set", action="append", default=[], help="SDS option override, e.g. --set l1=0.05")
    p.add_argument("--variants", default="", help="extra SDS option sets: name:key=val,key=val;name2:...")
    p.add_argument("--ops-samples", type=int, default=32, help="calibration sequences the --ops measurements use")
    p.add_argument("--no-base", action="store_true", help="skip the base pruners (ablations only)")
    p.add_argument("--base-time-only", action="store_true",
                   help="time the base pruner as a user runs it, without evaluating it (its perplexities are "
                        "deterministic: take them from another run of the same seed)")
    p.add_argument("--fit-variants", default="",
                   help="base pruner + block fit rows (S + block fit): name:lr=1e-4,epochs=1;name2:... (BlockFitOptions fields)")
    p.add_argument("--no-sds", action="store_true")
    p.add_argument("--only-variants", action="store_true", help="run the --variants without the default SDS")
    p.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    p.add_argument("--ops", action="store_true", help="also run the prox_step / Gram-vs-token measurements")
    p.add_argument("--holdout", type=float, default=0.15,
                   help="fraction at the end of the calibration text's token stream kept out of calibration: the "
                        "validation text whose perplexity chooses defaults (0: old protocol, windows from all of it)")
    p.add_argument("--val-windows", type=int, default=32, help="512-token windows of validation perplexity (held-out calib text)")
    p.add_argument("--other", default=str(DATA / "calib" / "brown_corpus.txt"),
                   help="another text (not the test) scored like the validation text, windows spread evenly over it "
                        "(over its last `holdout` fraction when it is also a calibration source)")
    p.add_argument("--quality-only", action="store_true",
                   help="skip the base pruner's separate timing run (the evaluated run is timed with its validation "
                        "stream): for quality comparisons such as the calibration sources")
    p.add_argument("--validation", default="auto", help="sds_prune's held-out calibration sequences (auto, a count, 0)")
    p.add_argument("--zeroshot", default="",
                   help="zero-shot tasks every row is also scored on, e.g. piqa,arc_easy,lambada_openai (default: none); "
                        "from $SDSX_DATA/zeroshot or ../shared/data/zeroshot, with the tokenizer's own BOS rule "
                        "(bos=auto, lm-eval's default) whatever --bos is")
    p.add_argument("--zs-limit", type=int, default=None, help="only the first N items of each zero-shot task (default: all)")
    p.add_argument("--zs-batch", type=int, default=8, help="sequences per forward call of the zero-shot scoring")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "sds.json")
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--checkpoint-root", type=Path, default=None,
                   help="checkpoint every evaluated pruning run block by block under this folder (one subfolder per "
                        "row and settings, removed when the row is saved), so that a killed run goes on inside the row "
                        "it was in; such a row's seconds then count only the last attempt (it records resumed=true)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --json (made with the same settings) and run only the missing ones; "
                        "each row records the run (process start) it came from, and time ratios count only within one run")
    args = p.parse_args(argv)
    if args.quality_only and args.base_time_only:
        p.error("--quality-only skips the timing run that --base-time-only keeps; pass one of them")
    zs_tasks: list[str] = []
    if args.zeroshot:
        from sdsx.eval.zeroshot import load_task, resolve_tasks

        if args.zs_limit is not None and args.zs_limit < 1:
            p.error(f"--zs-limit must be a positive count, got {args.zs_limit}")
        if args.zs_batch < 1:
            p.error(f"--zs-batch must be a positive count, got {args.zs_batch}")
        try:  # every task file read now, not after the first row's pruning
            zs_tasks = resolve_tasks(args.zeroshot)
            for task in zs_tasks:
                load_task(task, None, args.zs_limit)
        except (ValueError, FileNotFoundError, ImportError) as exc:
            p.error(f"--zeroshot: {exc}")
    info = sdsx.backend_info()
    if not info["extension_loaded"]:
        # the reference ops would make every time ratio (and a 262k run's hours) meaningless
        print(f"error: the sdsx extension is not loaded ({info['extension_error']}); build it with "
              "`pip install --no-build-isolation .` and run from outside the checkout, so that the installed "
              "package, not the source tree, is the one imported", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    from sdsx.data import load_text
    from sdsx.data.calibration import encode
    if args.bos is None:
        args.bos = MODELS[args.model][1]
    from sdsx.model.offline import load_offline

    model, tok = load_offline(args.model)
    calib, val_ids, other_ids, sources = build_texts(args, model, tok)
    eval_ids = encode(tok, load_text(args.wikitext), special_tokens=not uses_bos(args, tok))
    validation = None if args.validation in ("0", "none", "None") else (args.validation if args.validation == "auto" else _value(args.validation))
    base_opts = parse_sets(args.set)
    variants = [] if args.only_variants else [("sds", base_opts)]
    variants += [(name, {**base_opts, **opts}) for name, opts in (parse_variant(v) for v in args.variants.split(";") if v)]
    meta = dict(
        model=MODELS[args.model][0], calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        eval="WikiText-2 test", eval_seqlen=args.eval_seqlen, max_windows=args.max_windows,
        eval_tokens=min(args.max_windows or 10**9, eval_ids.numel() // args.eval_seqlen) * args.eval_seqlen,
        threads=args.threads, torch=torch.__version__, machine=platform.machine(), schedule=args.schedule,
        defaults=SDSOptions().to_dict(), holdout=args.holdout, val_windows=args.val_windows, other=args.other,
        validation=args.validation, seed=args.seed,
    )
    # keys that older result files lack are written only when they say something new, so that
    # --resume still accepts those files
    if sources["val_text"] != args.calib:
        meta["val_text"] = sources["val_text"]
    if sources["other_tail"]:
        meta["other_tail"] = True
    if args.bos != "never":
        meta["bos"] = args.bos
    if args.quality_only:
        meta["quality_only"] = True
    if zs_tasks:
        meta["zeroshot"] = {"tasks": zs_tasks, "limit": args.zs_limit, "bos": "auto"}
    rows: list[dict] = []
    run = time.strftime("%Y-%m-%dT%H:%M:%S")
    if args.resume and args.json.exists():
        old = json.loads(args.json.read_text())
        now = json.loads(json.dumps(meta))  # as it would be stored (tuples become lists)
        differ = sorted(k for k in set(now) | set(old["meta"]) if k != "ops" and now.get(k) != old["meta"].get(k))
        if differ:
            raise SystemExit(f"--resume: {args.json} was made with other settings ({', '.join(differ)}); pass another --json")
        meta, rows = old["meta"], old["rows"]
        print(f"resuming {args.json}: {len(rows)} row(s) kept", flush=True)

    def key(method: str, pattern: str, options=None) -> str:
        return json.dumps([method, pattern, options or {}], sort_keys=True, default=str)

    done = {key(r["method"], r["pattern"], r.get("options")) for r in rows}
    settings = json.dumps({k: v for k, v in meta.items() if k != "ops"}, sort_keys=True, default=str)

    def checkpoint(method: str, pattern: str, options=None) -> dict:
        """sdsx's checkpoint_dir for a row (empty without --checkpoint-root), and whether it resumes."""
        if args.checkpoint_root is None:
            return {}
        digest = hashlib.sha256((settings + key(method, pattern, options)).encode()).hexdigest()[:16]
        folder = args.checkpoint_root / f"{method}-{pattern.replace(':', '_')}-{digest}"
        resumed = folder.exists() and any(folder.iterdir())
        if resumed:
            print(f"{method} {pattern}: going on from the checkpoint {folder}", flush=True)
        return dict(checkpoint_dir=folder, resumed=resumed)

    def release(ckpt: dict) -> None:
        """Remove the checkpoint of a row once the row is saved."""
        if ckpt:
            shutil.rmtree(ckpt["checkpoint_dir"], ignore_errors=True)

    def todo(method: str, pattern: str, options=None) -> bool:
        if key(method, pattern, options) in done:
            print(f"{method} {pattern} {options or ''}: already in {args.json}", flush=True)
            return False
        return True

    def save():
        for r in rows:
            r.setdefault("run", run)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))

    def ppl(m):
        return sdsx.perplexity(m, eval_ids, tok, seqlen=args.eval_seqlen, max_windows=args.max_windows, progress=False, bos=args.bos)

    def scores(m) -> dict:
        """Validation perplexity (held-out calibration text: what defaults are chosen on), another
        text's, and the test text's (WikiText-2); with --zeroshot also the zero-shot tasks."""
        out = {}
        if val_ids is not None:
            out["ppl_val"] = sdsx.perplexity(m, val_ids, tok, seqlen=args.eval_seqlen, max_windows=args.val_windows, progress=False,
                                             bos=args.bos)
        if other_ids is not None:
            out["ppl_other"] = sdsx.perplexity(m, other_ids, tok, seqlen=args.eval_seqlen, progress=False, bos=args.bos)
        out["ppl"] = ppl(m)
        if zs_tasks:
            out["zeroshot"] = zeroshot_scores(m, tok, zs_tasks, args.zs_limit, args.zs_batch)
        return out

    if args.ops:
        meta["ops"] = ops_bench(model, calib, args.threads, args.ops_samples)
        print(json.dumps(meta["ops"], indent=2), flush=True)
        save()
    if args.dense and todo("dense", "-"):
        rows.append(dict(method="dense", pattern="-", **scores(model), seconds=0.0))
        print(rows[-1], flush=True)
        save()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    for pattern in args.patterns.split(","):
        pattern = pattern.strip()
        spec = float(pattern) if pattern.replace(".", "").isdigit() else pattern
        for pruner in args.pruners.split(","):
            if not args.no_base and todo(pruner, pattern):
                # the base as a user runs it (all windows, its default statistics, no validation
                # stream): the time SDS's is compared with; then again with the validation
                # windows for the error over depth (same weights up to rounding: its H covers
                # every window), which is the row evaluated
                plain_seconds = None
                if not args.quality_only:
                    model.load_state_dict(fresh)
                    t0 = time.perf_counter()
                    sdsx.prune(model, calib, pruner, spec, progress=False)
                    plain_seconds = time.perf_counter() - t0
                if args.base_time_only:
                    rows.append(dict(method=pruner, pattern=pattern, plain_seconds=plain_seconds, time_only=True))
                    print(rows[-1], flush=True)
                    save()
                else:
                    model.load_state_dict(fresh)
                    ckpt = checkpoint(pruner, pattern)
                    t0 = time.perf_counter()
                    base_val = auto_validation(args.nsamples) if validation == "auto" else validation
                    rep = sdsx.prune(model, calib, pruner, spec, progress=False, validation=base_val,
                                     checkpoint_dir=ckpt.get("checkpoint_dir"))
                    seconds = time.perf_counter() - t0  # pruning only, not the evaluation
                    rows.append(dict(method=pruner, pattern=pattern, **scores(model), seconds=seconds, plain_seconds=plain_seconds,
                                     forward_s=rep.forward_s, stats_s=rep.stats_s, solver_s=rep.solver_s, error=rep.total_error,
                                     blocks=rep.blocks, **({"resumed": ckpt["resumed"]} if ckpt else {})))
                    print(rows[-1], flush=True)
                    save()
                    release(ckpt)
            for name, fit in (parse_variant(v) for v in args.fit_variants.split(";") if v):
                if not todo(f"{name}-{pruner}", pattern, fit):
                    continue
                model.load_state_dict(fresh)
                t0 = time.perf_counter()
                base_val = auto_validation(args.nsamples) if validation == "auto" else validation
                rep = sdsx.prune(model, calib, pruner, spec, progress=False, validation=base_val, block_fit=fit)
                seconds = time.perf_counter() - t0
                rows.append(dict(method=f"{name}-{pruner}", pattern=pattern, options=fit, **scores(model), seconds=seconds,
                                 forward_s=rep.forward_s, stats_s=rep.stats_s, solver_s=rep.solver_s, error=rep.total_error,
                                 blocks=rep.blocks, fits=rep.fits))
                print({k: v for k, v in rows[-1].items() if k not in ("blocks", "fits")}, flush=True)
                save()
            if args.no_sds:
                continue
            for name, opts in variants:
                if not todo(f"{name}-{pruner}", pattern, opts):
                    continue
                model.load_state_dict(fresh)
                ckpt = checkpoint(f"{name}-{pruner}", pattern, opts)
                t0 = time.perf_counter()
                val_opt = validation if args.schedule == "interleaved" else None
                rep = sdsx.sds_prune(model, calib, spec, pruner, schedule=args.schedule, progress=False, validation=val_opt,
                                     checkpoint_dir=ckpt.get("checkpoint_dir"), **opts)
                seconds = time.perf_counter() - t0
                agree = [e["mask_agreement"] for e in rep.phase_errors.values() if "mask_agreement" in e]
                rows.append(dict(method=f"{name}-{pruner}", pattern=pattern, options=opts, **scores(model),
                                 seconds=seconds, forward_s=rep.forward_s, stats_s=rep.stats_s,
                                 solver_s=rep.solver_s, error=rep.total_error, improved_layers=rep.improved_layers,
                                 kept_phase1=len(rep.kept_phase1), layers=len(rep.phase_errors), passes=rep.passes,
                                 kept_blocks=rep.kept_blocks, blocks=rep.blocks, fits=rep.fits,
                                 model_guard=rep.model_guard, validation_sources=rep.validation_sources,
                                 mask_agreement=sum(agree) / len(agree) if agree else None,
                                 phase_errors=rep.phase_errors, **({"resumed": ckpt["resumed"]} if ckpt else {})))
                print({k: v for k, v in rows[-1].items()}, flush=True)
                save()
                release(ckpt)
    md = to_markdown(meta, rows)
    print(md)
    if args.md:
        args.md.write_text(md)
    return 0


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"SmolLM2-135M, calibration {meta['nsamples']} x {meta['seqlen']} tokens ({', '.join(Path(c).name for c in meta['calib'].split(','))}), "
        f"perplexity on {meta['eval']} ({meta['eval_tokens']:,} tokens in {meta['eval_seqlen']}-token windows), "
        f"{meta['threads']} thread(s), schedule {meta['schedule']}",
        "",
        "| method | pattern | options | val ppl | other-text ppl | WikiText-2 ppl | wall s | vs base time | calib error | layers improved | blocks kept phase 1 | mask agreement |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {(r["method"], r["pattern"]): r for r in rows}
    for r in rows:
        pruner = r["method"].split("-", 1)[-1]
        b = base.get((pruner, r["pattern"]))
        # SDS against the base as a user runs it (plain_seconds) where the file has it; a
        # --base-time-only row holds that time alone and no perplexities
        seconds = r.get("seconds", r.get("plain_seconds"))
        base_s = (b.get("plain_seconds") or b.get("seconds")) if b else None
        ratio = f"{seconds / base_s:.2f}x" if b and b is not r and base_s else ""
        opts = ",".join(f"{k}={v}" for k, v in (r.get("options") or {}).items())
        imp = f"{r['improved_layers']}/{r['layers']}" if "improved_layers" in r else ""
        err = f"{r['error']:.4g}" if r.get("error") is not None else ""
        val = f"{r['ppl_val']:.2f}" if "ppl_val" in r else ""
        other = f"{r['ppl_other']:.2f}" if "ppl_other" in r else ""
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else ""
        kept = f"{len(r['kept_blocks'])}/{len(r['blocks'])}" if r.get("blocks") and "kept_blocks" in r else ""
        agree = f"{r['mask_agreement']:.2%}" if r.get("mask_agreement") is not None else ""
        lines.append(f"| {r['method']} | {r['pattern']} | {opts} | {val} | {other} | {ppl} | {seconds:.0f} | {ratio} | {err} | "
                     f"{imp} | {kept} | {agree} |")
    tasks = list(dict.fromkeys(t for r in rows for t in (r.get("zeroshot") or {})))
    if tasks:
        limit = (meta.get("zeroshot") or {}).get("limit")
        lines += ["", f"Zero-shot accuracy ({'first ' + str(limit) + ' items per task' if limit else 'full sets'}, ± standard error):", "",
                  "| method | pattern | options | " + " | ".join(tasks) + " |", "|---|---|---|" + "---:|" * len(tasks)]
        for r in rows:
            if not r.get("zeroshot"):
                continue
            opts = ",".join(f"{k}={v}" for k, v in (r.get("options") or {}).items())
            cells = [f"{100 * z['acc']:.1f} ± {100 * (z.get('acc_stderr') or 0):.1f}" if (z := r["zeroshot"].get(t)) else "" for t in tasks]
            lines.append(f"| {r['method']} | {r['pattern']} | {opts} | " + " | ".join(cells) + " |")
    if "ops" in meta:
        o = meta["ops"]
        lines += [
            "",
            f"prox_step on {o['layer']} {o['shape']}: reference {o['prox_step_ref_ms']:.2f} ms, sdsx {o['prox_step_ms']:.2f} ms "
            f"({o['prox_step_speedup']:.2f}x). Re-dense, 20 iterations on {o['tokens']} tokens: Gram path {o['gram_ms']:.0f} ms "
            f"(objective {o['gram_objective']:.4g}), token path {o['token_ms']:.0f} ms (objective {o['token_objective']:.4g}), "
            f"{o['token_vs_gram_time']:.1f}x the Gram path's time; start objective {o['start_objective']:.4g}.",
        ]
        if "gram_iters_to_token_objective" in o:
            lines.append(
                f"The Gram path reaches the token path's 20-iteration objective in {o['gram_iters_to_token_objective']} "
                f"iterations, {o['gram_ms_to_token_objective']:.0f} ms: {o['gram_time_fraction_of_token']:.1%} of the token path's time."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
