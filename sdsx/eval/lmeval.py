"""lm-evaluation-harness on our zero-shot task files (the optional ``sdsx[lmeval]`` extra).

Nothing here imports ``lm_eval`` until :func:`lm_eval_zero_shot` is called. It writes one task
config per requested task that reads the local jsonl file (``dataset_path: json``), loads them with
``TaskManager(include_path=..., include_defaults=False)`` (indexing lm-eval's ~15k built-in tasks
takes seconds and is not needed), and runs ``simple_evaluate`` on the in-memory model offline. Seeds
are passed as None so that lm-eval does not re-seed the global generators, and BOS handling is
pinned to :mod:`sdsx.eval.zeroshot`'s (``add_bos_token`` is what ``bos`` decides there). The result
has the same shape as :func:`sdsx.eval.zeroshot.zero_shot`'s, so the two can be compared item by item.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from sdsx.data.bos import expects_bos
from sdsx.eval.zeroshot import DELIMITER, context_bos, load_task, resolve_tasks

__all__ = ["lm_eval_zero_shot", "task_config"]


def task_config(name: str, kind: str, path: str | os.PathLike) -> dict[str, Any]:
    """lm-eval task config (a dict; written as JSON, which is YAML) for one local task file.

    Fields are named directly (not through Jinja templates), so texts pass through unchanged.
    """
    common = {
        "task": f"sdsx_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}},
        "test_split": "test",
        "target_delimiter": DELIMITER,
        "num_fewshot": 0,
    }
    if kind == "choice":
        return {
            **common, "output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        }
    if kind == "partial":
        # an int from doc_to_text makes lm-eval score the shared target after every choice
        return {
            **common, "output_type": "multiple_choice", "doc_to_text": "gold", "doc_to_choice": "context_options",
            "doc_to_target": "continuation",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    # loglikelihood requests get no delimiter from lm-eval: it is part of the target
    return {
        **common, "output_type": "loglikelihood", "doc_to_text": "context",
        "doc_to_target": "{{'" + DELIMITER + "' + continuation}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


@contextlib.contextmanager
def _offline():
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def lm_eval_zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    *,
    bos: str = "auto",
    log_samples: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run lm-evaluation-harness 0.4 on the same task files as :func:`sdsx.eval.zeroshot.zero_shot`.

    Args: as :func:`~sdsx.eval.zeroshot.zero_shot` (the task files must be local). lm-eval adds BOS
    through the tokenizer's special tokens, so ``bos="always"`` works only with a tokenizer that
    starts texts with BOS anyway.
    Returns:
        {task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], ["perplexity"], "n", "kind",
        "source", ["samples"]}}; samples hold each item's log-likelihoods as lm-eval computed them.
    Raises:
        ImportError: lm-eval is not installed (``pip install 'sdsx[lmeval]'``).
        ValueError: ``bos="always"`` with a tokenizer that does not add BOS itself.
    """
    add_bos = context_bos(tokenizer, bos)
    if add_bos and not expects_bos(tokenizer):
        raise ValueError(
            "lm-eval prepends BOS only through the tokenizer's special tokens, and this tokenizer adds none: "
            "bos='always' needs the built-in evaluator (--harness sdsx)"
        )
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install 'sdsx[lmeval]' (lm-eval>=0.4,<0.5)") from None

    loaded = [load_task(t, data_dir, limit) for t in resolve_tasks(tasks)]
    for name, _, _, source in loaded:
        if source.startswith("hub:"):
            raise FileNotFoundError(f"the lm-eval adapter needs local task files; {name} came from the hub")
    training = model.training
    model.eval()
    with tempfile.TemporaryDirectory(prefix="sdsx-lmeval-") as folder, _offline():
        for name, kind, _, source in loaded:
            (Path(folder) / f"sdsx_{name}.yaml").write_text(json.dumps(task_config(name, kind, source), indent=1), encoding="utf-8")
        manager = TaskManager(include_path=folder, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[f"sdsx_{name}" for name, *_ in loaded], task_manager=manager, limit=limit,
            log_samples=log_samples, random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            fewshot_random_seed=None,
        )
    model.train(training)

    results: dict[str, dict[str, Any]] = {}
    for name, kind, items, source in loaded:
        raw = out["results"][f"sdsx_{name}"]
        res: dict[str, Any] = {"kind": kind, "n": len(items), "source": source}
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in raw:
                res[metric] = float(raw[f"{metric},none"])
                stderr = raw.get(f"{metric}_stderr,none")
                res[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        if log_samples:
            samples = sorted(out["samples"][f"sdsx_{name}"], key=lambda s: s["doc_id"])
            res["samples"] = [[float(r[0][0]) for r in s["resps"]] for s in samples]
        results[name] = res
    return results
