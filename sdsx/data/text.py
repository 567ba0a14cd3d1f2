"""Text sources: local .txt / .jsonl / WikiText .raw files, iterables of strings, and the hub
datasets of the SparseGPT/Wanda protocol (c4, wikitext2, ptb) when a hub is reachable."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["HUB_DATASETS", "load_text", "read_local", "hub_rows", "join_rows"]

#: name -> (datasets path, config, calibration split, evaluation split, text field)
HUB_DATASETS: dict[str, tuple[str, str | None, str, str, str]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "test", "sentence"),
    "c4": ("allenai/c4", None, "train", "validation", "text"),
}
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


def join_rows(rows: Iterable[str], sep: str = "\n\n") -> str:
    """Join dataset rows the way the SparseGPT/Wanda scripts do ("\\n\\n".join for WikiText)."""
    return sep.join(rows)


def _wikitext_rows(text: str) -> list[str]:
    # A local WikiText .raw file holds one dataset row per line (CRLF line ends here, empty rows
    # dropped); each hub row ends with "\n", so restore that before joining.
    return [line + "\n" for line in text.split("\n") if line]


def read_local(path: str | os.PathLike) -> tuple[str, list[str] | None]:
    """Read a local file: (text with CRLF normalised to LF, rows or None).

    .jsonl: one JSON object per line with a "text" field -> rows. WikiText .raw: one row per line
    -> rows. Anything else: plain text, no rows.
    """
    p = Path(path)
    raw = p.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(raw.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f'{p}:{number}: every line of a .jsonl source needs a string "text" field')
            rows.append(obj["text"])
        return join_rows(rows), rows
    if suffix == ".raw":
        rows = _wikitext_rows(raw)
        return join_rows(rows), rows
    return raw, None


def hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_rows(name: str, split: str) -> list[str]:
    """Rows of a known hub dataset via `datasets`; a clear error when the hub is unreachable."""
    if name not in HUB_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(HUB_DATASETS)}")
    path, config, _, _, field = HUB_DATASETS[name]
    offline = any(os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    advice = (
        f"pass a local path instead (a .txt, a .jsonl with a \"text\" field, or WikiText's wiki.{split}.raw) "
        "or an iterable of strings"
    )
    if not offline and not hub_reachable():
        raise ConnectionError(
            f"cannot load {name!r}: the Hugging Face hub is not reachable from this machine; {advice} "
            "(or set HF_DATASETS_OFFLINE=1 to use a copy already in the datasets cache)"
        )
    try:
        import datasets
    except ImportError:
        raise ImportError(f"loading {name!r} from the hub needs `pip install datasets`; or {advice}") from None
    try:
        if name == "c4":
            ds = datasets.load_dataset(path, data_files={split: _C4_FILES[split]}, split=split)
        else:
            ds = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # datasets raises many types for "not available"
        raise ConnectionError(f"could not load {name!r} ({split}) from the hub: {exc}; {advice}") from exc
    return list(ds[field])


def load_text(source: "str | os.PathLike | Iterable[str]", split: str = "test") -> str:
    """The evaluation text of a source, joined per the SparseGPT/Wanda perplexity protocol.

    Args:
        source: a local file (.txt, .jsonl with "text", WikiText .raw), a hub name ("wikitext2",
            "ptb", "c4"), or an iterable of strings (joined with blank lines).
        split: the split for hub names.
    Returns:
        One string: WikiText rows joined with "\\n\\n", PTB sentences with " ", C4 documents
        with " " (the first 1100 validation documents, as the SparseGPT scripts use).
    """
    if isinstance(source, (str, os.PathLike)):
        if Path(source).is_file():
            return read_local(source)[0]
        name = str(source).lower()
        if name in HUB_DATASETS:
            hub_split = HUB_DATASETS[name][3] if split == "test" else split
            rows = hub_rows(name, hub_split)
            if name == "ptb":
                return join_rows(rows, " ")
            if name == "c4":
                return join_rows(rows[:1100], " ")
            return join_rows(rows)
        raise FileNotFoundError(
            f"{str(source)!r} is neither an existing file nor a known dataset name ({', '.join(sorted(HUB_DATASETS))})"
        )
    if isinstance(source, (bytes, bytearray)):
        raise TypeError("pass text as str, not bytes")
    rows = list(source)
    if not all(isinstance(r, str) for r in rows):
        raise TypeError("an iterable source must yield strings")
    return join_rows(rows)
