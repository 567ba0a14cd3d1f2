"""Saving and loading pruned models: a standard Hugging Face folder plus ``sdsx.json`` (what was
done, with which calibration and versions, per-layer sparsity, the report), and optionally the
masks as bitmaps in ``masks.safetensors``. Loading checks that the stored pattern still holds.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from sdsx.checkpoint import MANIFEST
from sdsx.checkpoint import SUBDIR as CHECKPOINT_SUBDIR
from sdsx.model.blocks import get_weight, model_linears

log = logging.getLogger("sdsx")

__all__ = [
    "CHECKPOINT_MARKER",
    "META_NAME",
    "MASKS_NAME",
    "FORMAT",
    "PatternError",
    "check_out_dir",
    "check_pattern",
    "layer_sparsity",
    "load",
    "load_masks",
    "save_pruned",
]

META_NAME = "sdsx.json"
MASKS_NAME = "masks.safetensors"
#: a folder holding this file is an unfinished run's checkpoint, which the run may write into
CHECKPOINT_MARKER = MANIFEST
FORMAT = "sdsx-pruned-model"
FORMAT_VERSION = 1

# files of an earlier save that would shadow or contradict a new one (stale weight shards)
_STALE = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", MASKS_NAME)


class PatternError(ValueError):
    """A saved pruned model no longer has the sparsity pattern recorded in its ``sdsx.json``."""


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> str:
    """May a run write its model into ``out_dir``? Returns "new" (missing), "empty", "checkpoint"
    (holds :data:`CHECKPOINT_MARKER`: an unfinished run of ours, resumable) or "overwrite".

    Raises:
        FileExistsError: a non-empty folder that is not a checkpoint, without ``overwrite``.
        NotADirectoryError: ``out_dir`` is a file.
    """
    p = Path(out_dir).expanduser()
    if not p.exists():
        return "new"
    if not p.is_dir():
        raise NotADirectoryError(f"output path {p} exists and is not a folder")
    if not any(p.iterdir()):
        return "empty"
    if (p / CHECKPOINT_MARKER).is_file() or {c.name for c in p.iterdir()} <= {CHECKPOINT_SUBDIR, MANIFEST + ".tmp"}:
        return "checkpoint"  # a run of ours, possibly killed before its first checkpoint was complete
    if overwrite:
        return "overwrite"
    raise FileExistsError(f"output folder {p} is not empty; pass --overwrite (overwrite=True) to replace it, or choose another folder")


def _versions() -> dict[str, str]:
    import transformers

    import sdsx

    return {
        "sdsx": sdsx.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def layer_sparsity(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{qualified linear name: {"shape": [out, in], "zeros": count, "sparsity": fraction}} of every
    linear in the decoder blocks (exact zeros counted)."""
    out = {}
    for name, module in model_linears(model).items():
        W = get_weight(module)
        zeros = int((W == 0).sum())
        out[name] = {"shape": list(W.shape), "zeros": zeros, "sparsity": zeros / W.numel()}
    return out


def json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    return str(value)


def _report_dict(report: Any) -> dict | None:
    if report is None:
        return None
    if isinstance(report, Mapping):
        return dict(report)
    if hasattr(report, "to_dict"):
        return report.to_dict()
    raise TypeError(f"report must be a PruneReport (or its to_dict()), got {type(report).__name__}")


def _pattern_of(model: nn.Module) -> str | None:
    from sdsx.pruners.spec import detect_pattern

    found = {detect_pattern(get_weight(m)) for m in model_linears(model).values()}
    return found.pop() if len(found) == 1 else None


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    report: Any = None,
    meta: Mapping[str, Any] | None = None,
    *,
    save_masks: bool = False,
    overwrite: bool = False,
) -> Path:
    """Save a pruned model as a standard Hugging Face folder plus ``sdsx.json``.

    The folder loads with plain ``AutoModelForCausalLM.from_pretrained`` (safetensors; pruned
    weights stay exact zeros); :func:`load` also checks the pattern.

    Args:
        model: the pruned causal LM.
        tokenizer: its tokenizer (saved alongside), or None.
        out_dir: the folder; see :func:`check_out_dir` for when an existing one is accepted.
        report: the :class:`~sdsx.api.PruneReport` / SDSReport of the run (or its ``to_dict()``);
            supplies method and pattern.
        meta: more to record, e.g. ``{"calibration": {...}, "model": "smollm2-135m"}``; the keys
            "method" and "pattern" override the report's.
        save_masks: also write the keep-masks (nonzero entries) as bitmaps in ``masks.safetensors``.
        overwrite: replace a non-empty folder that is not a checkpoint.
    Returns:
        The folder's path.
    """
    out = Path(out_dir).expanduser()
    check_out_dir(out, overwrite)
    meta = dict(meta or {})
    rep = _report_dict(report)
    method = meta.pop("method", None) or (rep or {}).get("method")
    pattern = meta.pop("pattern", None) or (rep or {}).get("sparsity") or _pattern_of(model)
    if pattern is not None:
        from sdsx.pruners.spec import SparsitySpec

        pattern = str(SparsitySpec.parse(pattern)) if pattern != "unstructured" else pattern
    layers = layer_sparsity(model)
    numel = sum(r["shape"][0] * r["shape"][1] for r in layers.values())
    zeros = sum(r["zeros"] for r in layers.values())

    out.mkdir(parents=True, exist_ok=True)
    for glob in _STALE:
        for stale in out.glob(glob):
            stale.unlink()
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    if save_masks:
        _save_masks(model, out / MASKS_NAME)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "pattern": pattern,
        "calibration": meta.pop("calibration", None),
        "versions": _versions(),
        "overall_sparsity": zeros / numel if numel else 0.0,
        "layers": layers,
        "masks": MASKS_NAME if save_masks else None,
        "meta": meta,
        "report": rep,
    }
    tmp = out / (META_NAME + ".tmp")
    tmp.write_text(json.dumps(json_safe(record), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / META_NAME)
    log.info("saved %s model (%s, %.2f%% zeros in the block linears) to %s", method or "pruned", pattern, 100 * record["overall_sparsity"], out)
    return out


# ------------------------------------------------------------------------------------------ masks
def _save_masks(model: nn.Module, path: Path) -> None:
    import numpy as np
    from safetensors.torch import save_file

    tensors, shapes = {}, {}
    for name, module in model_linears(model).items():
        W = get_weight(module)
        keep = (W != 0).cpu().numpy().reshape(-1)
        tensors[name] = torch.from_numpy(np.packbits(keep, bitorder="little"))
        shapes[name] = ",".join(str(s) for s in W.shape)
    # One metadata entry holding sorted JSON: safetensors writes metadata from a hash map, so with
    # several keys their order (and the file's bytes) would change from run to run.
    info = {"format": "sdsx-mask-bitmap-v2 (numpy.packbits, bitorder little, row-major (out, in); 1 = keep)", "shapes": shapes}
    save_file(tensors, str(path), metadata={"sdsx": json.dumps(info, sort_keys=True)})


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Keep-masks (bool (out, in), True = keep) from a ``masks.safetensors`` file or its folder."""
    import numpy as np
    from safetensors import safe_open

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MASKS_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no mask file at {p} (saved only with save_masks=True / --save-masks)")
    masks = {}
    with safe_open(str(p), framework="pt") as fh:
        shapes = fh.metadata() or {}
        if "sdsx" in shapes:  # v2; v1 files keep one "out,in" entry per mask
            shapes = json.loads(shapes["sdsx"]).get("shapes", {})
        for name in fh.keys():
            if name not in shapes:
                raise ValueError(f"{p}: mask {name} has no shape in the file's metadata")
            shape = tuple(int(s) for s in shapes[name].split(","))
            count = int(np.prod(shape))
            bits = np.unpackbits(fh.get_tensor(name).numpy(), count=count, bitorder="little")
            masks[name] = torch.from_numpy(bits.astype(bool)).reshape(shape)
    return masks


# ----------------------------------------------------------------------------------------- checks
def check_pattern(model: nn.Module, meta: Mapping[str, Any], masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Check that every pruned linear still has the stored pattern.

    N:M: every group of M consecutive inputs of every row holds at least M - N zeros.
    Unstructured: every layer holds at least as many zeros as were recorded at save time.
    Masks (when given): every entry outside the mask is zero.

    Raises:
        PatternError: naming the first layer that breaks it.
    """
    from sdsx.pruners.spec import SparsitySpec

    linears = model_linears(model)
    recorded = meta.get("layers") or {}
    missing = sorted(set(recorded) - set(linears))
    if missing:
        raise PatternError(f"the saved model has no layer {missing[0]} that sdsx.json records; the folder does not match its sdsx.json")
    pattern = meta.get("pattern")
    spec = None
    if pattern not in (None, "unstructured"):
        spec = SparsitySpec.parse(pattern)
    for name, module in linears.items():
        W = get_weight(module)
        if spec is not None and spec.is_nm:
            if W.shape[1] % spec.m:
                raise PatternError(f"{name}: {W.shape[1]} inputs are not a multiple of {spec.m}, so it cannot hold {spec}")
            zeros = (W == 0).reshape(W.shape[0], -1, spec.m).sum(-1)
            bad = zeros < spec.m - spec.n
            if bool(bad.any()):
                row, group = (int(i) for i in bad.nonzero()[0])
                raise PatternError(
                    f"{name} no longer has the {spec} pattern: row {row}, inputs {group * spec.m}..{group * spec.m + spec.m - 1} "
                    f"hold {int(zeros[row, group])} zeros (need {spec.m - spec.n}); the weights were changed after pruning"
                )
        rec = recorded.get(name)
        if rec is not None:
            if list(W.shape) != list(rec["shape"]):
                raise PatternError(f"{name} has shape {list(W.shape)}, but sdsx.json records {rec['shape']}")
            zeros = int((W == 0).sum())
            if zeros < int(rec["zeros"]):
                raise PatternError(
                    f"{name} holds {zeros} zeros, but {rec['zeros']} were saved ({pattern} pattern): "
                    "the weights were changed after pruning"
                )
        if masks is not None and name in masks:
            mask = masks[name].to(W.device)
            if mask.shape != W.shape:
                raise PatternError(f"{name}: mask of shape {tuple(mask.shape)} does not fit the weight {tuple(W.shape)}")
            off = (W != 0) & ~mask
            if bool(off.any()):
                r, c = (int(i) for i in off.nonzero()[0])
                raise PatternError(f"{name}: weight [{r}, {c}] is nonzero but pruned in the saved mask; the weights were changed after pruning")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``sdsx.json`` of a saved folder."""
    p = Path(path).expanduser()
    f = p / META_NAME
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a folder")
    if not f.is_file():
        raise FileNotFoundError(f"{p} has no {META_NAME}: not a model saved by sdsx (load it with transformers' from_pretrained)")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{f} is not an sdsx model record (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta


def load(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = "auto",
    check: bool = True,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load a model saved by :func:`save_pruned`: (model in eval mode, tokenizer or None, meta).

    Args:
        path: the folder.
        dtype: parameter dtype ("auto": as saved).
        check: verify that the stored pattern (and the masks, when saved) still hold.
        device: move the model there.
    Raises:
        FileNotFoundError: not a folder, or no ``sdsx.json``.
        PatternError: a pruned linear no longer has the stored pattern.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    meta = read_meta(p)
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    model.eval()
    tokenizer = None
    if any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    if check:
        masks = load_masks(p) if meta.get("masks") else None
        check_pattern(model, meta, masks)
    if device is not None:
        model.to(device)
    return model, tokenizer, meta
