"""The jobs behind ``sdsx eval`` and ``sdsx compare`` as library calls, beside :func:`sdsx.job.run`
(``sdsx prune``): the command line only parses its flags into the configurations these take.

    evaluate(RunConfig(model=ModelConfig("runs/sds24"), evaluation=EvalConfig(tasks="piqa")))
    compare(RunConfig(model=ModelConfig("smollm2-135m")), [MethodConfig("wanda", sparsity="2:4"),
            MethodConfig("sds", pruner="wanda", sparsity="2:4")])
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sdsx.config import MethodConfig, RunConfig
from sdsx.job import (
    Evaluator,
    JobError,
    PruneContext,
    check_inputs,
    load_model,
    prepare,
    prune_model,
    report_dir_for,
    resolve_device,
    result_row,
    strip_samples,
)

log = logging.getLogger("sdsx")

__all__ = ["CompareResult", "EvalResult", "compare", "evaluate"]


@dataclass
class EvalResult:
    """What :func:`evaluate` measured: the table row, the zero-shot results (with per-item
    samples), and the report folder (None when none was asked for)."""

    rows: list[dict[str, Any]]
    zeroshot: dict[str, Any] = field(default_factory=dict)
    report_dir: Path | None = None


@dataclass
class CompareResult:
    """What :func:`compare` did: one table row per run (the dense model first), the pruning
    reports, and the report folder."""

    rows: list[dict[str, Any]]
    reports: list[Any]
    report_dir: Path


def evaluate(config: RunConfig, *, command: str | None = None) -> EvalResult:
    """Evaluate the model ``config.model`` names (dense, or a folder saved by sdsx, whose pattern is
    checked on load) as ``config.evaluation`` says; without ``evaluation.ppl`` the local WikiText-2
    is scored only when no tasks are given. Writes report.json / report.md to
    ``config.output.report`` when set."""
    config.validate()
    evaluation = config.evaluation
    device = resolve_device(config.engine.device)
    check_inputs(evaluation, None)
    model, tok, meta, label = load_model(config.model.name, config.model.dtype)
    evaluator = Evaluator(evaluation, tok, config.model.bos, config.engine.progress, ppl_default=not evaluation.tasks)
    if evaluator.empty:
        raise JobError("nothing to evaluate: give --ppl SOURCE and/or --tasks LIST")
    ev = evaluator(model, device)
    method = (meta or {}).get("method") or "dense"
    sparsity = str((meta or {}).get("pattern") or "0")
    result = EvalResult([result_row(label, method, sparsity, ev, evaluator.ppl_name)], ev.get("zeroshot") or {})
    if config.output.report:
        from sdsx.report import write_report

        result.report_dir = Path(config.output.report).expanduser()
        run_meta = {"model": config.model.name, "command": command or "sdsx.commands.evaluate", "evaluation": strip_samples(ev),
                    "protocol": evaluator.protocol, "saved_meta": meta}
        write_report(result.report_dir, result.rows, [], meta=run_meta, title=f"sdsx eval {label}", zeroshot=ev.get("zeroshot"))
    return result


def compare(config: RunConfig, methods: Sequence[MethodConfig], *, command: str | None = None) -> CompareResult:
    """Prune the dense model ``config.model`` names with every method in ``methods`` (each with its
    own sparsity) on one calibration set, restoring the dense weights between runs; evaluate the
    dense model and every pruned one as ``config.evaluation`` says, and write the report to
    ``config.output.report`` (default sdsx-runs/<time>-<model>-compare)."""
    from sdsx.model.blocks import get_weight, model_linears, set_weight
    from sdsx.pruners.spec import SparsitySpec

    if config.engine.distributed:
        raise JobError("--distributed is for `sdsx prune --method sds`; compare runs every method in one process")
    for m in methods:  # every method's settings are checked before any work
        config.replace(method=m).validate()
    p = prepare(config, "compare needs the dense model")
    device, model, label, evaluator, calib = p.device, p.model, p.label, p.evaluator, p.calib
    linears = model_linears(model)
    dense_weights = {name: get_weight(m).clone() for name, m in linears.items()}

    def restore() -> None:
        for name, m in linears.items():
            set_weight(m, dense_weights[name])

    dense = evaluator(model, device) if not evaluator.empty else {}
    rows, reports = [result_row(label, "dense", "0", dense, evaluator.ppl_name)], []
    ctx = PruneContext(device, config.engine.progress, None, p.tokenizer, config.calibration.seed, config.model.bos)
    try:
        for k, m in enumerate(methods, 1):
            sparsity = str(SparsitySpec.parse(m.sparsity))
            log.info("compare %d/%d: %s %s", k, len(methods), m.full_name, sparsity)
            restore()
            t0 = time.perf_counter()
            reports.append(prune_model(model, calib, m, sparsity, ctx))
            seconds = time.perf_counter() - t0
            ev = evaluator(model, device) if not evaluator.empty else {}
            rows.append(result_row(label, m.full_name, sparsity, ev, evaluator.ppl_name, seconds))
    finally:
        restore()
    report_dir = report_dir_for(config.output.report, label, "compare")
    from sdsx.report import write_report

    run_meta = {"model": config.model.name, "command": command or "sdsx.commands.compare", "calibration": p.calib_desc,
                "methods": [m.full_name for m in methods], "sparsity": list(dict.fromkeys(str(m.sparsity) for m in methods)),
                "evaluation": evaluator.settings()}
    write_report(report_dir, rows, reports, title=f"sdsx compare {label}", meta=run_meta)
    return CompareResult(rows, reports, report_dir)
