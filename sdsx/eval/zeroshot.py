"""Zero-shot evaluation: multiple-choice tasks scored by continuation log-likelihood, WinoGrande by
partial scoring, LAMBADA by exact greedy match, with lm-evaluation-harness's definitions.

The protocol (pinned; it is what lm-evaluation-harness 0.4 does with an HF causal LM and the
default settings, so the numbers are comparable with it):

* A request is a (context, continuation) pair of strings. Whitespace at the end of the context is
  moved to the start of the continuation. Context and context + continuation are tokenized
  separately, without special tokens; the continuation's tokens are the tail of the joint
  tokenization after the context's tokens (so a space goes with the word after it).
* The prefix token follows lm-eval 0.4.13's default (``add_bos_token=None``: the tokenizer's own
  special tokens): with ``bos="auto"`` every context starts with BOS when the tokenizer starts texts
  with it (:func:`sdsx.data.bos.expects_bos`: Gemma, LLaMA-2, OPT), and with nothing otherwise
  (GPT-2, SmolLM2, Qwen); an empty context becomes the single prefix token (BOS, or EOS when the
  tokenizer has no BOS). ``bos="always"`` prepends that prefix token to every context,
  ``bos="never"`` to none but the empty ones (older lm-eval's default ``add_bos_token=False``).
* Sequences longer than the model's maximum positions + 1 are cut on the left.
* The log-likelihood of a continuation is the sum of its tokens' log-probabilities given
  everything before them; it is greedy when every token is the argmax.

Tasks (``{query, choices, gold}`` files: piqa, arc_easy, openbook_qa, copa):
    context = query, continuation = " " + choice (lm-eval's target delimiter);
    acc = [argmax_i loglik_i == gold]; acc_norm = [argmax_i loglik_i / len(choice_i) == gold]
    where len counts the choice's *characters* (lm-eval's implementation; its documentation
    says bytes, which differs only for non-ASCII text). Ties go to the first choice.
WinoGrande (``{context_options, continuation, gold}``): partial scoring: the shared continuation
    " " + continuation is scored after each context option; acc only.
LAMBADA (``{context, continuation}``): continuation " " + word; acc = the greedy decoding
    reproduces all its tokens; perplexity = exp(-mean over items of the continuation's summed
    log-likelihood) (lm-eval's per-item definition, not per token).

Standard errors: binomial sqrt(p (1 - p) / (n - 1)) for accuracies (lm-eval's sample standard
error of the mean); for LAMBADA's perplexity the delta method ppl * sd(loglik) / sqrt(n) (lm-eval
bootstraps it instead, which gives nearly the same value).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

log = logging.getLogger("sdsx")

__all__ = [
    "KNOWN_TASKS",
    "TASK_KINDS",
    "accepts_logits_to_keep",
    "context_bos",
    "default_data_dir",
    "encode_pair",
    "load_task",
    "loglikelihoods",
    "resolve_tasks",
    "zero_shot",
]

#: task name -> kind ("choice": {query, choices, gold}; "partial": {context_options, continuation,
#: gold}; "greedy": {context, continuation})
TASK_KINDS: dict[str, str] = {
    "piqa": "choice",
    "arc_easy": "choice",
    "openbook_qa": "choice",
    "copa": "choice",
    "winogrande": "partial",
    "lambada_openai": "greedy",
}
KNOWN_TASKS: tuple[str, ...] = tuple(TASK_KINDS)
_ALIASES = {
    "arc-easy": "arc_easy",
    "arc_e": "arc_easy",
    "openbookqa": "openbook_qa",
    "obqa": "openbook_qa",
    "lambada": "lambada_openai",
    "lambada-openai": "lambada_openai",
}
#: lm-eval's target delimiter: joins context and continuation
DELIMITER = " "

# Hub sources (only tried when the hub is reachable): (datasets path, config, split)
_HUB: dict[str, tuple[str, str | None, str]] = {
    "piqa": ("baber/piqa", None, "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "openbook_qa": ("allenai/openbookqa", "main", "test"),
    "copa": ("aps/super_glue", "copa", "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "lambada_openai": ("EleutherAI/lambada_openai", "default", "test"),
}


# ------------------------------------------------------------------------------------------ data
def default_data_dir() -> Path | None:
    """$SDSX_DATA/zeroshot, else <repo>/../shared/data/zeroshot when it exists, else None."""
    from sdsx.data.paths import data_root

    root = data_root()
    if root is None:
        return None
    if os.environ.get("SDSX_DATA"):
        return root / "zeroshot"
    return root / "zeroshot" if (root / "zeroshot").is_dir() else None


def _fail(where: str, what: str) -> None:
    raise ValueError(f"{where}: {what}")


def _check_record(kind: str, obj: Any, where: str) -> dict:
    """Validate one item of a task file; raise ValueError naming ``where`` (file:line)."""
    if not isinstance(obj, dict):
        _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    if kind == "choice":
        q, ch, gold = obj.get("query"), obj.get("choices"), obj.get("gold")
        if not isinstance(q, str):
            _fail(where, 'needs a string "query"')
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            _fail(where, 'needs "choices": a list of at least 2 non-empty strings')
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(ch):
            _fail(where, f'needs an integer "gold" in [0, {len(ch)}), got {gold!r}')
        return {"query": q, "choices": list(ch), "gold": gold}
    if kind == "partial":
        opts, cont, gold = obj.get("context_options"), obj.get("continuation"), obj.get("gold")
        if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(c, str) for c in opts):
            _fail(where, 'needs "context_options": a list of at least 2 strings')
        if not isinstance(cont, str) or not cont.strip():
            _fail(where, 'needs a non-empty string "continuation"')
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(opts):
            _fail(where, f'needs an integer "gold" in [0, {len(opts)}), got {gold!r}')
        return {"context_options": list(opts), "continuation": cont, "gold": gold}
    ctx, cont = obj.get("context"), obj.get("continuation")
    if not isinstance(ctx, str) or not isinstance(cont, str) or not cont.strip():
        _fail(where, 'needs a string "context" and a non-empty string "continuation"')
    return {"context": ctx, "continuation": cont}


def _kind_of(obj: Any) -> str | None:
    if isinstance(obj, dict):
        if "choices" in obj:
            return "choice"
        if "context_options" in obj:
            return "partial"
        if "context" in obj:
            return "greedy"
    return None


def read_jsonl(path: str | os.PathLike, kind: str | None = None, limit: int | None = None) -> tuple[str, list[dict]]:
    """Read a task file: (kind, items). ``kind`` None detects it from the first item's fields.

    Raises ValueError naming the file and line of the first malformed line.
    """
    p = Path(path)
    items: list[dict] = []
    with p.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            where = f"{p}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if kind is None:
                kind = _kind_of(obj)
                if kind is None:
                    _fail(where, "cannot tell the task format: expected {query, choices, gold}, "
                          "{context_options, continuation, gold} or {context, continuation}")
            items.append(_check_record(kind, obj, where))
    if not items:
        raise ValueError(f"{p}: the task file holds no items")
    return kind or "choice", items


def _from_hub(name: str, limit: int | None) -> list[dict]:
    """Rows of a known task from the hub, converted to our local formats (those of
    ../shared/data/zeroshot, so hub and local files give the same prompts)."""
    import datasets

    path, config, split = _HUB[name]
    ds = datasets.load_dataset(path, config, split=split)
    rows = list(ds if limit is None else ds.select(range(min(limit, len(ds)))))
    return [convert_hub_row(name, r) for r in rows]


def convert_hub_row(name: str, r: dict) -> dict:
    """One hub row of task ``name`` in our local format."""
    if name == "piqa":
        return {"query": f"Question: {r['goal']}\n", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
    if name == "arc_easy":
        labels = list(r["choices"]["label"])
        return {"query": f"Question: {r['question']}", "choices": list(r["choices"]["text"]), "gold": labels.index(r["answerKey"])}
    if name == "openbook_qa":
        labels = list(r["choices"]["label"])
        return {"query": r["question_stem"], "choices": list(r["choices"]["text"]), "gold": labels.index(r["answerKey"])}
    if name == "copa":
        connector = {"cause": "because", "effect": "therefore"}[r["question"]]
        lower = [c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
        return {"query": f"{r['premise'].strip()[:-1]}, {connector}", "choices": lower, "gold": int(r["label"])}
    if name == "winogrande":
        s = r["sentence"]
        i = s.index("_")
        return {
            "context_options": [s[:i] + r["option1"], s[:i] + r["option2"]],
            "continuation": s[i + 1 :].strip(),
            "gold": int(r["answer"]) - 1,
        }
    if name == "lambada_openai":
        words = r["text"].split(" ")
        return {"context": " ".join(words[:-1]), "continuation": words[-1]}
    raise ValueError(f"no hub converter for task {name!r}")


def resolve_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Normalise a task list: "piqa,arc_easy", a list of names or .jsonl paths, or "all"."""
    if isinstance(tasks, str):
        tasks = [t for t in (s.strip() for s in tasks.split(",")) if t]
    out: list[str] = []
    for t in tasks:
        if not isinstance(t, str):
            raise TypeError(f"a task must be a name or a .jsonl path, got {type(t).__name__}")
        if t.lower() == "all":
            out.extend(KNOWN_TASKS)
            continue
        key = _ALIASES.get(t.lower(), t.lower())
        if key in TASK_KINDS:
            out.append(key)
        elif t.endswith(".jsonl") or os.sep in t:
            out.append(t)  # a path; checked when loaded
        else:
            raise ValueError(f"unknown task {t!r}; known tasks: {', '.join(KNOWN_TASKS)} (or give a path to a .jsonl file)")
    if not out:
        raise ValueError(f"no tasks given; known tasks: {', '.join(KNOWN_TASKS)}")
    return list(dict.fromkeys(out))


def load_task(task: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> tuple[str, str, list[dict], str]:
    """Load one task: (name, kind, items, source).

    ``task`` is a known name (looked up as ``<data_dir>/<name>.jsonl``, then on the hub when it is
    reachable) or a path to a .jsonl file (format detected from its fields). ``limit`` keeps the
    first items.
    """
    name = _ALIASES.get(task.lower(), task.lower())
    if name not in TASK_KINDS:
        p = Path(task).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"task file {task} does not exist (known task names: {', '.join(KNOWN_TASKS)})")
        kind, items = read_jsonl(p, None, limit)
        return p.stem, kind, items, str(p)
    kind = TASK_KINDS[name]
    folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if folder is not None and (folder / f"{name}.jsonl").is_file():
        path = folder / f"{name}.jsonl"
        return name, kind, read_jsonl(path, kind, limit)[1], str(path)
    from sdsx.data.text import hub_reachable

    offline = any(os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    where = f"{folder}" if folder is not None else "no data folder (SDSX_DATA is unset and ../shared/data/zeroshot does not exist)"
    if offline or not hub_reachable():
        raise FileNotFoundError(
            f"task {name!r}: no {name}.jsonl in {where}, and the Hugging Face hub is not reachable; pass data_dir= "
            f"(CLI: --data-dir) a folder holding {name}.jsonl in the format of ../shared/data/zeroshot, or a path to a .jsonl file"
        )
    path, config, split = _HUB[name]
    log.info("zero-shot: %s not found locally; loading %s (%s, %s) from the hub", name, path, config, split)
    try:
        items = _from_hub(name, limit)
    except ImportError:
        raise ImportError(f"loading task {name!r} from the hub needs `pip install datasets`; or pass a local .jsonl") from None
    return name, kind, items, f"hub:{path}/{config or ''}:{split}"


# ---------------------------------------------------------------------------------- tokenization
def _tok(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if callable(tokenizer):
        ids = tokenizer(text)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    raise TypeError(f"tokenizer must be a Hugging Face tokenizer or a callable str -> ids, got {type(tokenizer).__name__}")


def _prefix_id(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("an empty context (or bos='always') needs a tokenizer with a BOS or EOS token")


def context_bos(tokenizer: Any, bos: str = "auto") -> bool:
    """Whether every context starts with the prefix token under ``bos`` ("auto", "always", "never")."""
    from sdsx.data.bos import BOS_MODES, expects_bos

    if bos not in BOS_MODES:
        raise ValueError(f"bos must be one of {', '.join(BOS_MODES)}, got {bos!r}")
    return bos == "always" or (bos == "auto" and expects_bos(tokenizer))


def encode_pair(tokenizer: Any, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """Token ids (context, continuation) per the module's protocol (lm-eval's ``_encode_pair``)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = _tok(tokenizer, context + continuation)
    ctx = _tok(tokenizer, context) if context else []
    cont = whole[len(ctx) :]
    if add_bos:
        ctx = [_prefix_id(tokenizer)] + ctx
    elif not ctx:
        ctx = [_prefix_id(tokenizer)]
    if not cont:
        raise ValueError(f"the continuation {continuation!r} after {context[-40:]!r} tokenizes to no tokens")
    return ctx, cont


# ------------------------------------------------------------------------------------- scoring
def _max_length(model: nn.Module) -> int:
    from sdsx.model.blocks import max_positions

    return max_positions(model) or 2048


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` by name (transformers' causal LMs do:
    the LM head is then applied only at the positions it lists)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def loglikelihoods(
    model: nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is_greedy) for each (context ids, continuation ids).

    Longest requests first, right-padded batches; no attention mask is needed because padding
    comes after every scored position of a causal model. When the model's forward takes
    ``logits_to_keep`` (:func:`accepts_logits_to_keep`), the LM head runs only at the positions
    that predict a continuation token of some row of the batch (a 1-D index tensor, the union over
    the rows); otherwise at every position. The results agree up to float rounding; with a large
    vocabulary (Gemma's 262k) the head is most of the cost, so this is several times faster.
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    limit = _max_length(model)
    device = next(model.parameters()).device
    prepared = []
    for ctx, cont in requests:
        full = (list(ctx) + list(cont))[-(limit + 1) :]
        prepared.append((full[:-1], list(cont)[-len(full) + 1 :] if len(cont) >= len(full) else list(cont)))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(prepared)
    select = accepts_logits_to_keep(model)
    training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="req", disable=not progress, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(prepared[i][0]) for i in idx)
                inp = torch.zeros(len(idx), width, dtype=torch.long)
                for row, i in enumerate(idx):
                    seq = prepared[i][0]
                    inp[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                # position t predicts token t + 1: the continuation's tokens are predicted by the
                # last n positions of the (unpadded) input
                spans = [(len(prepared[i][0]) - len(prepared[i][1]), len(prepared[i][0])) for i in idx]
                if select:
                    needed = sorted({t for a, b in spans for t in range(a, b)})
                    keep = torch.tensor(needed, dtype=torch.long)
                    column = torch.full((width,), -1, dtype=torch.long)  # position -> column of the logits
                    column[keep] = torch.arange(len(needed))
                    res = model(input_ids=inp.to(device), use_cache=False, logits_to_keep=keep.to(device))
                else:
                    column = torch.arange(width)
                    res = model(input_ids=inp.to(device), use_cache=False)
                logits = res.logits if hasattr(res, "logits") else res[0]
                for row, i in enumerate(idx):
                    cont = prepared[i][1]
                    a, b = spans[row]
                    part = logits[row, column[a:b].to(logits.device)].float().log_softmax(-1)
                    target = torch.tensor(cont, dtype=torch.long, device=part.device)
                    ll = float(part.gather(1, target[:, None]).sum())
                    greedy = bool((part.argmax(-1) == target).all())
                    out[i] = (ll, greedy)
                bar.update(len(idx))
    finally:
        model.train(training)
    return out  # type: ignore[return-value]


def _stderr(values: Sequence[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    p = sum(values) / n
    return math.sqrt(max(p * (1.0 - p), 0.0) / (n - 1))


def _argmax(xs: Sequence[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def _evaluate(  # noqa: PLR0913
    kind: str,
    items: list[dict],
    model: nn.Module,
    tokenizer: Any,
    batch_size: int,
    progress: bool,
    add_bos: bool,
    desc: str,
    log_samples: bool,
) -> dict[str, Any]:
    requests: list[tuple[list[int], list[int]]] = []
    spans: list[tuple[int, int]] = []
    for item in items:
        begin = len(requests)
        if kind == "choice":
            for choice in item["choices"]:
                requests.append(encode_pair(tokenizer, item["query"], DELIMITER + choice, add_bos))
        elif kind == "partial":
            for option in item["context_options"]:
                requests.append(encode_pair(tokenizer, option, DELIMITER + item["continuation"], add_bos))
        else:
            requests.append(encode_pair(tokenizer, item["context"], DELIMITER + item["continuation"], add_bos))
        spans.append((begin, len(requests)))
    scores = loglikelihoods(model, requests, batch_size=batch_size, progress=progress, desc=desc)

    acc: list[float] = []
    acc_norm: list[float] = []
    lls_all: list[float] = []
    samples = []
    for item, (b, e) in zip(items, spans):
        lls = [s[0] for s in scores[b:e]]
        if kind == "greedy":
            hit = float(scores[b][1])
            acc.append(hit)
            lls_all.append(lls[0])
            if log_samples:
                samples.append({"loglikelihood": lls[0], "greedy": bool(hit)})
            continue
        gold = item["gold"]
        pred = _argmax(lls)
        acc.append(float(pred == gold))
        sample = {"loglikelihoods": lls, "pred": pred, "gold": gold}
        if kind == "choice":
            norm = [ll / len(c) for ll, c in zip(lls, item["choices"])]
            pred_norm = _argmax(norm)
            acc_norm.append(float(pred_norm == gold))
            sample["pred_norm"] = pred_norm
        if log_samples:
            samples.append(sample)

    n = len(items)
    result: dict[str, Any] = {"kind": kind, "n": n, "acc": sum(acc) / n, "acc_stderr": _stderr(acc)}
    if kind == "choice":
        result["acc_norm"] = sum(acc_norm) / n
        result["acc_norm_stderr"] = _stderr(acc_norm)
    if kind == "greedy":
        mean = sum(lls_all) / n
        ppl = math.exp(-mean)
        result["perplexity"] = ppl
        if n > 1:
            sd = math.sqrt(sum((x - mean) ** 2 for x in lls_all) / (n - 1))
            result["perplexity_stderr"] = ppl * sd / math.sqrt(n)
        else:
            result["perplexity_stderr"] = None
    result["chance"] = (
        sum(1.0 / len(i["choices"]) for i in items) / n if kind == "choice"
        else sum(1.0 / len(i["context_options"]) for i in items) / n if kind == "partial"
        else 0.0
    )
    if log_samples:
        result["samples"] = samples
    return result


def zero_shot(  # noqa: PLR0913
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    *,
    bos: str = "auto",
    log_samples: bool = False,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of a causal LM on multiple-choice tasks (see the module docstring).

    Args:
        model: a causal LM returning logits (evaluated where its parameters are).
        tokenizer: its tokenizer (Hugging Face, or a callable str -> ids).
        tasks: names ("piqa", "arc_easy", "openbook_qa", "copa", "winogrande", "lambada_openai",
            or "all"), comma-separated or as a list; an item may also be a path to a .jsonl file
            in one of the three formats.
        data_dir: the folder holding ``<task>.jsonl``; default ``$SDSX_DATA/zeroshot``, else
            ``<repo>/../shared/data/zeroshot`` when it exists. A task missing there is loaded from
            the hub with `datasets` when the hub is reachable; offline that is an error.
        limit: evaluate only the first ``limit`` items of each task.
        batch_size: sequences per forward call.
        progress: show a tqdm bar per task.
        bos: the prefix token of every context: "auto" (default; BOS when the tokenizer starts texts
            with it, as lm-eval), "always" or "never" (see the module docstring).
        log_samples: also return each item's log-likelihoods and predictions under "samples".
    Returns:
        {task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], ["perplexity",
        "perplexity_stderr"], "n", "kind", "chance", "source"}}.
    Raises:
        ValueError: unknown task, malformed file (the message names file and line), bad limit.
        FileNotFoundError: a task file is missing and the hub is not reachable.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    add_bos = context_bos(tokenizer, bos)
    names = resolve_tasks(tasks)
    loaded = [load_task(t, data_dir, limit) for t in names]  # all files checked before any scoring
    results: dict[str, dict[str, Any]] = {}
    for name, kind, items, source in loaded:
        res = _evaluate(kind, items, model, tokenizer, batch_size, progress, add_bos, name, log_samples)
        res["source"] = source
        results[name] = res
        extra = f", acc_norm {res['acc_norm']:.4f}" if "acc_norm" in res else ""
        extra += f", perplexity {res['perplexity']:.3f}" if "perplexity" in res else ""
        log.info("zero-shot %s: acc %.4f%s (n=%d)", name, res["acc"], extra, res["n"])
    return results
