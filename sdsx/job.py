"""The whole job as one library call: :func:`run` loads the model, builds the calibration,
evaluates the dense model, prunes with any method, evaluates again, saves, writes the report,
resumes after an interruption and cleans up. ``sdsx prune`` parses its flags into a
:class:`~sdsx.config.RunConfig` and calls it; ``sdsx eval`` and ``sdsx compare`` use the same parts.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdsx.config import CONFIG_NAME, CalibrationConfig, EvalConfig, MethodConfig, RunConfig
from sdsx.data.paths import data_root

log = logging.getLogger("sdsx")

__all__ = [
    "BUILTIN_MODELS", "CALIB_FILE", "Evaluator", "JobError", "RunResult", "WIKITEXT_FILE", "calibrate", "check_inputs",
    "load_model", "prepare", "prune_model", "resolve_device", "result_row", "run", "strip_samples",
]

BUILTIN_MODELS = ("smollm2-135m", "gemma3-270m")  # sdsx.model.offline
CALIB_FILE = Path("calib") / "sotu_1990_2021.txt"
WIKITEXT_FILE = Path("wikitext2") / "wiki.test.raw"
_DENSE_EVAL = "dense-eval.json"


class JobError(Exception):
    """A user-facing error of a job (the command line prints it as one line)."""


def default_file(rel: Path) -> Path | None:
    """``rel`` under the offline data root, when it exists there."""
    root = data_root()
    return root / rel if root is not None and (root / rel).is_file() else None


# ------------------------------------------------------------------------------ model and device
def _hub_offline() -> bool:
    if any(os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from sdsx.data.text import hub_reachable

    return not hub_reachable()


def load_model(name: str, dtype: str = "float32") -> tuple[Any, Any, dict | None, str]:
    """(model, tokenizer, sdsx meta or None, label) for a model name: a built-in offline model, a
    local folder (one saved by sdsx is checked) or a hub name."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if name.lower() in BUILTIN_MODELS:
        from sdsx.model.offline import load_offline

        model, tok = load_offline(name, dtype=torch_dtype)
        return model, tok, None, name.lower()
    path = Path(name).expanduser()
    if path.is_dir():
        from sdsx.io import META_NAME, load

        if (path / META_NAME).is_file():
            model, tok, meta = load(path, dtype=torch_dtype)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"model folder {path} has no config.json: not a Hugging Face model folder")
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
            model.eval()
            try:
                tok = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError, TypeError) as exc:
                raise JobError(f"model folder {path} has no usable tokenizer ({str(exc).splitlines()[0]})") from exc
            meta = None
        if tok is None:
            raise JobError(f"model folder {path} has no tokenizer files; save the tokenizer with the model")
        return model, tok, meta, path.name
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path or path.exists():
        raise FileNotFoundError(f"model folder {name} does not exist")
    if _hub_offline():
        raise JobError(
            f"unknown model {name!r}: not a local folder, not a built-in name ({', '.join(BUILTIN_MODELS)}), and the "
            "Hugging Face hub is not reachable from this machine; pass a local folder or a built-in name"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise JobError(f"could not load model {name!r} from the hub: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, tok, None, name


def point_at_blocks(model: Any, path: str | None) -> None:
    """Tell sdsx where the decoder blocks of an unknown layout are."""
    if path is not None:
        from sdsx.model.blocks import use_blocks

        use_blocks(model, path)


def resolve_device(arg: str | None) -> Any:
    """The torch.device a device setting names (None: cuda when available, else cpu)."""
    import torch

    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(arg)
    except RuntimeError:
        raise JobError(f"unknown device {arg!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise JobError(f"device {arg!r} asked for, but torch has no CUDA device here")
    return dev


# ----------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Perplexity text tokenized once, zero-shot tasks checked before any long work."""

    def __init__(self, cfg: EvalConfig, tokenizer: Any, bos: str, progress: bool, ppl_default: bool) -> None:
        from sdsx.data.bos import bos_id, protocol
        from sdsx.eval.zeroshot import resolve_tasks

        self.cfg, self.tokenizer, self.bos, self.progress = cfg, tokenizer, bos, progress
        self.ppl_source = self._ppl_source(cfg.ppl, ppl_default)
        self.ppl_name = None
        self.ids = None
        token = bos_id(tokenizer, bos)
        self.protocol = protocol(bos, token)
        if self.ppl_source is not None:
            from sdsx.data import load_text
            from sdsx.data.calibration import encode

            text = load_text(self.ppl_source)
            self.ids = encode(tokenizer, text, special_tokens=token is None)
            self.ppl_name = short_name(self.ppl_source)
        self.tasks = resolve_tasks(cfg.tasks) if cfg.tasks else []

    @staticmethod
    def _ppl_source(arg: str | None, use_default: bool) -> str | None:
        if arg is not None:
            return None if arg.lower() == "none" else arg
        if not use_default:
            return None
        found = default_file(WIKITEXT_FILE)
        if found is None:
            log.warning("no --ppl given and no local WikiText-2 (set SDSX_DATA or pass --ppl wikitext2 / a file): perplexity skipped")
        return str(found) if found is not None else None

    @property
    def empty(self) -> bool:
        return self.ids is None and not self.tasks

    def settings(self) -> dict[str, Any]:
        """What a report records about the evaluation (with the window protocol)."""
        c = self.cfg
        return {"ppl_source": self.ppl_source, "ppl_seqlen": c.ppl_seqlen, "max_windows": c.max_windows,
                "tasks": self.tasks, "limit": c.limit, **self.protocol}

    def cache_key(self, label: str) -> dict[str, Any]:
        """What a stored dense evaluation must match to be reused."""
        c = self.cfg
        return {"model": label, "ppl": self.ppl_source, "ppl_seqlen": c.ppl_seqlen, "max_windows": c.max_windows,
                "tasks": self.tasks, "limit": c.limit, "harness": c.harness, "bos": self.protocol["bos_token_id"]}

    def __call__(self, model: Any, device: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        c = self.cfg
        if self.ids is not None:
            from sdsx.eval.perplexity import perplexity

            t0 = time.perf_counter()
            out["ppl"] = perplexity(
                model, self.ids, self.tokenizer, seqlen=c.ppl_seqlen, batch_size=1, max_windows=c.max_windows,
                device=device, progress=self.progress, bos=self.bos,
            )
            log.info("perplexity on %s: %.3f (%.1fs)", self.ppl_name, out["ppl"], time.perf_counter() - t0)
        if self.tasks:
            if c.harness == "lm-eval":
                from sdsx.eval.lmeval import lm_eval_zero_shot as zero_shot_run
            else:
                from sdsx.eval.zeroshot import zero_shot as zero_shot_run

            from sdsx.eval.perplexity import evaluating_on

            with evaluating_on(model, device):
                out["zeroshot"] = zero_shot_run(
                    model, self.tokenizer, self.tasks, data_dir=c.data_dir, limit=c.limit, batch_size=c.batch_size, bos=self.bos,
                    **({"progress": self.progress} if c.harness == "sdsx" else {}),
                )
        return out


def short_name(source: str) -> str:
    p = Path(source)
    if p.name == "wiki.test.raw":
        return "wikitext2"
    return p.stem if p.suffix else source


def result_row(model_label: str, method: str, sparsity: str, ev: dict[str, Any], ppl_name: str | None,
               seconds: float | None = None) -> dict[str, Any]:
    """One row of the results table."""
    row: dict[str, Any] = {"model": model_label, "method": method, "sparsity": sparsity}
    if "ppl" in ev:
        row[f"ppl {ppl_name}"] = ev["ppl"]
    for task, res in ev.get("zeroshot", {}).items():
        row[f"{task} acc"] = res["acc"]
        if "acc_norm" in res:
            row[f"{task} acc_norm"] = res["acc_norm"]
        if "perplexity" in res:
            row[f"{task} ppl"] = res["perplexity"]
    if ev.get("zeroshot"):
        accs = [res["acc"] for res in ev["zeroshot"].values()]
        row["mean acc"] = sum(accs) / len(accs)
    if seconds is not None:
        row["prune s"] = seconds
    return row


def strip_samples(ev: dict[str, Any]) -> dict[str, Any]:
    """Evaluation results without per-item samples (for JSON)."""
    out = dict(ev)
    if "zeroshot" in out:
        out["zeroshot"] = {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in out["zeroshot"].items()}
    return out


def check_inputs(evaluation: EvalConfig, calibration: CalibrationConfig | None) -> None:
    """Fail on missing or malformed inputs before the model is loaded (minutes) or pruned (hours);
    ``calibration`` None: a job without calibration (evaluation only)."""
    from sdsx.data.text import HUB_DATASETS
    from sdsx.eval.zeroshot import load_task, resolve_tasks

    for t in resolve_tasks(evaluation.tasks) if evaluation.tasks else []:
        load_task(t, evaluation.data_dir, evaluation.limit)
    if evaluation.tasks and evaluation.harness == "lm-eval":
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise JobError("--harness lm-eval needs lm-evaluation-harness: pip install 'sdsx[lmeval]' (or use the built-in --harness sdsx)")
    sources = [("--ppl", evaluation.ppl)] + ([("--calib", calibration.source)] if calibration is not None else [])
    for flag, whole in sources:
        if whole is None or whole.lower() == "none" and flag == "--ppl":
            continue
        if flag == "--calib" and whole.strip().lower() == "self":
            continue
        parts = [whole] if flag == "--ppl" or Path(whole).expanduser().is_file() else [p.strip() for p in whole.split(",") if p.strip()]
        for source in parts:
            if not Path(source).expanduser().is_file() and source.lower() not in HUB_DATASETS:
                raise FileNotFoundError(
                    f"{flag} {source}: no such file (or give a hub dataset name: {', '.join(sorted(HUB_DATASETS))}, which needs network"
                    + ("; several sources separated by commas, or self)" if flag == "--calib" else ")")
                )
    if calibration is not None and calibration.source is None and default_file(CALIB_FILE) is None:
        raise JobError(
            "no calibration text: pass --calib (a .txt/.jsonl file, or c4 / wikitext2 with network); "
            f"the default {CALIB_FILE} was not found under $SDSX_DATA or ../shared/data"
        )


def _dense_eval(evaluate: Evaluator, model: Any, device: Any, out: str | None, label: str) -> dict[str, Any]:
    """The dense model's evaluation; with an output folder it is kept in the checkpoint folder, so
    that a resumed run does not evaluate the dense model again."""
    from sdsx.checkpoint import SUBDIR

    key = evaluate.cache_key(label)
    cache = Path(out).expanduser() / SUBDIR / _DENSE_EVAL if out is not None else None
    if cache is not None and cache.is_file():
        try:
            stored = json.loads(cache.read_text(encoding="utf-8"))
            if stored.get("key") == json.loads(json.dumps(key)):
                log.info("dense evaluation taken from the checkpoint in %s", out)
                return stored["result"]
        except (OSError, ValueError):
            pass
    result = evaluate(model, device)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}, default=float), encoding="utf-8")
        os.replace(tmp, cache)
    return result


# ------------------------------------------------------------------------------------ calibration
def calibrate(cfg: CalibrationConfig, tokenizer: Any, model: Any, bos: str, progress: bool) -> tuple[Any, dict[str, Any]]:
    """The calibration windows and their description for the report."""
    from sdsx.data.sources import calibration_from

    source = cfg.source
    if source is None:
        found = default_file(CALIB_FILE)
        if found is None:
            raise JobError(
                "no calibration text: pass --calib (a .txt/.jsonl file, or c4 / wikitext2 with network); "
                f"the default {CALIB_FILE} was not found under $SDSX_DATA or ../shared/data"
            )
        source = str(found)
    t0 = time.perf_counter()
    ids = calibration_from(source, tokenizer, model, nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed,
                           progress=progress, bos=bos)
    log.info("calibration: %d x %d tokens from %s (%.1fs)", cfg.nsamples, cfg.seqlen, source, time.perf_counter() - t0)
    from sdsx.data.bos import bos_id, protocol
    from sdsx.data.sources import SELF

    windows = protocol(bos, bos_id(tokenizer, bos))
    if source.strip().lower() == SELF:  # sampled sequences start as self_calibration says, whatever bos is
        windows = {"bos": None, "bos_token_id": getattr(tokenizer, "bos_token_id", None), "windows": "sampled from the dense model"}
    desc = {"source": source, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed, "tokens": int(ids.numel()),
            **windows}
    return ids, desc


# ---------------------------------------------------------------------------------------- pruning
@dataclass
class PruneContext:
    """What pruning needs besides the method: where, whether to show progress, the checkpoint folder,
    and for SDS's other-domain validation file the tokenizer, calibration seed and window start."""

    device: Any = None
    progress: bool = True
    checkpoint_dir: str | None = None
    tokenizer: Any = None
    seed: int = 0
    bos: str = "auto"


def _other_validation(m: MethodConfig, calib: Any, ctx: PruneContext) -> Any:
    """SDS's other-domain validation: "self", None, or windows of a local text as long as the calibration's."""
    value = str(m.other_validation or "self")
    if value.lower() in ("self", "none"):
        return None if value.lower() == "none" else "self"
    path = Path(value).expanduser()
    if not path.is_file():
        raise JobError(f"--other-validation {value!r} is neither self, none nor a text file")
    if ctx.tokenizer is None:
        raise JobError("--other-validation with a text file needs the model's tokenizer")
    from sdsx.api import held_count
    from sdsx.data.calibration import calibration
    from sdsx.defaults import auto_validation

    total = int(calib.shape[0])
    count = held_count(auto_validation(total) if m.validation == "auto" else (m.validation or None), total)
    if not count:
        return None
    return calibration(str(path), ctx.tokenizer, nsamples=count, seqlen=int(calib.shape[1]), seed=ctx.seed + 1, bos=ctx.bos)


def prune_model(model: Any, calib: Any, m: MethodConfig, sparsity: str, ctx: PruneContext) -> Any:
    """Prune ``model`` in place with the method ``m`` names (sds-<pruner> or a registered pruner)
    at ``sparsity``; returns the report."""
    validation = m.validation if m.validation != 0 else None
    if m.name == "sds":
        from sdsx.sds import sds_prune

        overrides = dict(m.options)
        if m.block_fit is not None:
            overrides["block_fit"] = m.block_fit
        if m.pruner_options:
            overrides["pruner_options"] = dict(m.pruner_options)
        return sds_prune(
            model, calib, sparsity, m.pruner, schedule=m.schedule or "interleaved", early_exit_params=m.early_exit_params,
            device=ctx.device, progress=ctx.progress, checkpoint_dir=ctx.checkpoint_dir, validation=validation,
            other_validation=_other_validation(m, calib, ctx), **overrides,
        )
    from sdsx.api import prune

    kwargs: dict[str, Any] = {"checkpoint_dir": ctx.checkpoint_dir}
    from sdsx.pruners.sds import SHARED_PRUNER_FIELDS, SDSOptions

    for key in SHARED_PRUNER_FIELDS:
        if key in m.options:
            kwargs[key] = m.options[key]
    if m.report_error is not None:
        kwargs["report_error"] = m.report_error
    if m.pruner_options:
        kwargs["options"] = dict(m.pruner_options)
    if m.block_fit:
        given = {k: v for k, v in m.options.items() if k in ("block_lr", "block_target", "block_epochs")}
        kwargs["block_fit"] = SDSOptions(**given).block_fit_options()
        kwargs["validation"] = validation  # "auto" resolves in sdsx.prune, as from Python
    return prune(model, calib, m.name, sparsity, device=ctx.device, progress=ctx.progress, **kwargs)


# ------------------------------------------------------------------------------------------- run
@dataclass
class Prepared:
    """A pruning job's inputs, loaded: the device, the dense model and its tokenizer and label, the
    evaluator (texts tokenized, tasks checked) and the calibration windows with their provenance."""

    device: Any
    model: Any
    tokenizer: Any
    label: str
    evaluator: Evaluator
    calib: Any
    calib_desc: dict[str, Any]


def prepare(config: RunConfig, purpose: str) -> Prepared:
    """Check the evaluation and calibration settings, load the dense model ``config.model`` names
    (an already pruned one is refused: ``purpose`` says what the dense model is needed for), and
    build the evaluator and the calibration windows."""
    device = resolve_device(config.engine.device)
    check_inputs(config.evaluation, config.calibration)
    model, tok, meta, label = load_model(config.model.name, config.model.dtype)
    point_at_blocks(model, config.model.blocks)
    if meta is not None and meta.get("pattern"):
        raise JobError(f"{config.model.name} is already pruned ({meta.get('method')} {meta.get('pattern')}); {purpose}")
    progress, bos = config.engine.progress, config.model.bos
    evaluator = Evaluator(config.evaluation, tok, bos, progress, ppl_default=True)
    calib, calib_desc = calibrate(config.calibration, tok, model, bos, progress)
    return Prepared(device, model, tok, label, evaluator, calib, calib_desc)


@dataclass
class RunResult:
    """What :func:`run` did: the results table rows (dense and pruned), the pruning report, the
    report folder, the output folder (or None) and the configuration it ran."""

    rows: list[dict[str, Any]]
    report: Any
    report_dir: Path
    out: Path | None
    config: RunConfig
    dense: dict[str, Any] = field(default_factory=dict)
    pruned: dict[str, Any] = field(default_factory=dict)


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(p for p in parts if p)).strip("_")


def report_dir_for(arg: str | None, *parts: str) -> Path:
    """The report folder: ``arg``, else sdsx-runs/<time>-<parts>."""
    if arg is not None:
        return Path(arg).expanduser()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("sdsx-runs") / _slug(stamp, *parts)


def run(config: RunConfig, *, command: str | None = None) -> RunResult | None:
    """Run one job (see :class:`~sdsx.config.RunConfig`): check the configuration and the inputs
    (bad input: one error, nothing written), load the model, build the calibration, evaluate the
    dense model, prune, evaluate the pruned model, save it (``output.out``, with the configuration
    as run-config.json, and the checkpoint a killed run resumes from, removed at the end), write the
    report and return a :class:`RunResult`. ``command`` is recorded in the report (the CLI passes its
    command line). Under ``engine.distributed`` ranks other than 0 return None.
    """
    from sdsx.checkpoint import Checkpoint, CheckpointMismatch
    from sdsx.io import check_out_dir, save_pruned
    from sdsx.pruners.spec import SparsitySpec

    config.validate()
    m, out = config.method, config.output.out
    sparsity = str(SparsitySpec.parse(m.sparsity))
    method = m.full_name
    if config.engine.distributed:
        from sdsx.parallel import init_distributed, install_stop_message, worker

        config = config.replace(method={"schedule": "parallel"})
        m = config.method
        rank, world = init_distributed()
        install_stop_message(out)
        if rank > 0:  # ranks 1..N-1 need no model: they work on the layers rank 0 writes to out
            worker(out)
            return None
        log.info("distributed run: rank 0 of %d (phase 1, evaluation, saving); ranks 1..%d do phases 2 and 3", world, world - 1)
    if out is not None:
        state = check_out_dir(out, config.output.overwrite)
        if state == "checkpoint":
            log.info("output folder %s holds an sdsx checkpoint: resuming from it", out)
    p = prepare(config, "prune the dense model")
    device, model, tok, label, evaluate, calib, calib_desc = p.device, p.model, p.tokenizer, p.label, p.evaluator, p.calib, p.calib_desc
    progress, bos = config.engine.progress, config.model.bos

    rows = []
    dense = _dense_eval(evaluate, model, device, out, label) if not evaluate.empty else {}
    if dense:
        rows.append(result_row(label, "dense", "0", dense, evaluate.ppl_name))
    ctx = PruneContext(device, progress, out, tok, config.calibration.seed, bos)
    t0 = time.perf_counter()
    try:
        report = prune_model(model, calib, m, sparsity, ctx)
    except CheckpointMismatch:
        if not config.output.overwrite:
            raise
        log.warning("overwrite: discarding the checkpoint of another run in %s", out)
        Checkpoint(out, {}).remove()
        report = prune_model(model, calib, m, sparsity, ctx)
    seconds = max(time.perf_counter() - t0, report.total_s)
    pruned = evaluate(model, device) if not evaluate.empty else {}
    rows.append(result_row(label, method, sparsity, pruned, evaluate.ppl_name, seconds))

    run_meta = {
        "model": config.model.name, "method": method, "sparsity": sparsity, "calibration": calib_desc,
        "command": command or "sdsx.run",
        "evaluation": evaluate.settings(),
        "dense": strip_samples(dense), "pruned": strip_samples(pruned),
        "config": config.to_dict(),
    }
    if out is not None:
        save_pruned(model, tok, out, report, dict(run_meta), save_masks=config.output.save_masks, overwrite=True)
        config.save(Path(out).expanduser() / CONFIG_NAME)
    report_dir = report_dir_for(config.output.report if config.output.report or out is None else str(Path(out) / "report"),
                                label, method, sparsity.replace(":", "_"))
    from sdsx.report import write_report

    write_report(report_dir, rows, [report], meta=run_meta, title=f"sdsx prune {label}: {method} {sparsity}")
    config.save(report_dir / CONFIG_NAME)
    if out is not None:
        Checkpoint(out, {}).remove()  # everything is saved: the folder is a finished model now
    return RunResult(rows, report, report_dir, Path(out) if out is not None else None, config, dense, pruned)
