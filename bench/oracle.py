"""Regression oracle: SHA-256 digests of the weights a fixed set of runs produces.

Record them before code moves, check them after: a refactor must change no weight. Each case
prunes a model in place (tiny random LLaMA / OPT / GPT-2 models, and SmolLM2-135M at a small
calibration set) and hashes every parameter's bytes in name order.

    python bench/oracle.py --record bench/results/oracle.json          # before the change
    python bench/oracle.py --check bench/results/oracle.json           # after: exit 1 on a difference
    python bench/oracle.py --check bench/results/oracle.json --tiny    # the tiny models only (seconds)

Digests hold on one machine kind and one torch build (the kernels' summation order may differ on
another CPU); the file records both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Case:
    """One run: a model maker, the calibration, and the pruning call."""

    name: str
    model: str  # "tiny-<family>" or "smollm2"
    call: str  # "prune" or "sds"
    kwargs: dict[str, Any] = field(default_factory=dict)


TINY = [
    Case("tiny-llama magnitude 50%", "tiny-llama", "prune", {"method": "magnitude", "sparsity": 0.5}),
    Case("tiny-llama wanda 2:4", "tiny-llama", "prune", {"method": "wanda", "sparsity": "2:4"}),
    Case("tiny-opt wanda 50%", "tiny-opt", "prune", {"method": "wanda", "sparsity": 0.5}),
    Case("tiny-llama sparsegpt 2:4", "tiny-llama", "prune", {"method": "sparsegpt", "sparsity": "2:4"}),
    Case("tiny-gpt2 sparsegpt 50%", "tiny-gpt2", "prune", {"method": "sparsegpt", "sparsity": 0.5}),
    Case("tiny-llama sparsegpt 2:4 block fit", "tiny-llama", "prune",
         {"method": "sparsegpt", "sparsity": "2:4", "validation": 2, "block_fit": True}),
    Case("tiny-llama sds-sparsegpt 2:4 interleaved", "tiny-llama", "sds", {"sparsity": "2:4", "pruner": "sparsegpt"}),
    Case("tiny-opt sds-wanda 50% interleaved", "tiny-opt", "sds", {"sparsity": 0.5, "pruner": "wanda"}),
    Case("tiny-llama sds-sparsegpt 2:4 no other validation", "tiny-llama", "sds",
         {"sparsity": "2:4", "pruner": "sparsegpt", "other_validation": None}),
    Case("tiny-llama sds-sparsegpt 50% phased", "tiny-llama", "sds", {"sparsity": 0.5, "pruner": "sparsegpt", "schedule": "phased"}),
    Case("tiny-gpt2 sds-wanda 2:4 phased", "tiny-gpt2", "sds", {"sparsity": "2:4", "pruner": "wanda", "schedule": "phased"}),
    Case("tiny-llama sds-sparsegpt 2:4 parallel", "tiny-llama", "sds", {"sparsity": "2:4", "pruner": "sparsegpt", "schedule": "parallel"}),
]
SMOL = [
    Case("smollm2 sparsegpt 2:4", "smollm2", "prune", {"method": "sparsegpt", "sparsity": "2:4"}),
    Case("smollm2 wanda 50%", "smollm2", "prune", {"method": "wanda", "sparsity": 0.5}),
    Case("smollm2 sparsegpt 50% block fit", "smollm2", "prune",
         {"method": "sparsegpt", "sparsity": 0.5, "validation": 2, "block_fit": True}),
    Case("smollm2 sds-sparsegpt 2:4 interleaved", "smollm2", "sds", {"sparsity": "2:4", "pruner": "sparsegpt"}),
    Case("smollm2 sds-wanda 50% interleaved", "smollm2", "sds", {"sparsity": 0.5, "pruner": "wanda"}),
]


def _tiny_model(family: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

    if family == "llama":
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    elif family == "opt":
        config = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=64)
    else:
        config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _model_and_calib(kind: str, cache: dict[str, Any]) -> tuple[torch.nn.Module, torch.Tensor]:
    if kind.startswith("tiny-"):
        calib = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
        return _tiny_model(kind.split("-", 1)[1]), calib
    import copy

    if "smollm2" not in cache:
        from sdsx.data.calibration import calibration
        from sdsx.data.paths import data_root
        from sdsx.model.smollm2 import load_smollm2

        root = data_root()
        if root is None:
            raise SystemExit("the SmolLM2 cases need the offline data: set SDSX_DATA (or use --tiny)")
        model, tok = load_smollm2()
        text = root / "calib" / "sotu_1990_2021.txt"
        cache["smollm2"] = (model, calibration(str(text), tok, nsamples=8, seqlen=128, seed=0))
    model, calib = cache["smollm2"]
    return copy.deepcopy(model), calib


def digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_case(case: Case, cache: dict[str, Any]) -> str:
    import sdsx

    model, calib = _model_and_calib(case.model, cache)
    call: Callable[..., Any] = sdsx.prune if case.call == "prune" else sdsx.sds_prune
    call(model, calib, progress=False, **case.kwargs)
    return digest(model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="write the digests to this JSON file")
    mode.add_argument("--check", type=Path, help="compare with the digests in this JSON file")
    p.add_argument("--tiny", action="store_true", help="only the tiny random models (seconds; no SmolLM2)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cases = TINY if args.tiny else TINY + SMOL
    cache: dict[str, Any] = {}
    found: dict[str, str] = {}
    for case in cases:
        t0 = time.perf_counter()
        found[case.name] = run_case(case, cache)
        print(f"{case.name}: {found[case.name][:16]} ({time.perf_counter() - t0:.1f}s)", flush=True)
    env = {"torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version()}
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps({"env": env, "digests": found}, indent=1) + "\n")
        print(f"recorded {len(found)} digests in {args.record}")
        return 0
    recorded = json.loads(args.check.read_text())
    if recorded.get("env", {}).get("torch") != env["torch"]:
        print(f"note: recorded with torch {recorded.get('env', {}).get('torch')}, running {env['torch']}")
    differ = [n for n in found if recorded["digests"].get(n) != found[n]]
    missing = [n for n in found if n not in recorded["digests"]]
    for n in differ:
        print(f"DIFFERS: {n}" + (" (not recorded)" if n in missing else ""))
    print(f"{len(found) - len(differ)} of {len(found)} digests match")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
