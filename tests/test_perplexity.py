"""Perplexity (SparseGPT/Wanda protocol) against a hand computation on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny

from sdsx.eval import perplexity


def hand_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    n = ids.numel() // seqlen
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            window = ids[w * seqlen : (w + 1) * seqlen]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), -1)
            for t in range(seqlen - 1):
                nll -= float(logp[t, window[t + 1]])
                count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_hand_computation(family):
    model = make_tiny(family)
    ids = torch.randint(0, 128, (5 * 16 + 7,), generator=torch.Generator().manual_seed(0))  # a ragged tail
    expected = hand_ppl(model, ids, 16)
    got = perplexity(model, ids, seqlen=16, batch_size=2, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    # batching does not matter
    assert perplexity(model, ids, seqlen=16, batch_size=5, progress=False) == pytest.approx(got, rel=1e-6)


def test_text_needs_tokenizer_and_uses_it():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, "some text", seqlen=8)

    def tok(text):
        return [ord(c) % 128 for c in text]

    text = "the quick brown fox jumps over the lazy dog " * 4
    ids = torch.tensor(tok(text))
    assert perplexity(model, text, tok, seqlen=16, progress=False) == pytest.approx(
        perplexity(model, ids, seqlen=16, progress=False)
    )


def test_seqlen_capped_at_model_positions_and_max_windows():
    model = make_tiny("gpt2")  # 256 positions
    ids = torch.randint(0, 128, (3 * 256,), generator=torch.Generator().manual_seed(1))
    capped = perplexity(model, ids, seqlen=2048, progress=False)
    assert capped == pytest.approx(perplexity(model, ids, seqlen=256, progress=False))
    first = perplexity(model, ids, seqlen=256, max_windows=1, progress=False)
    assert first == pytest.approx(hand_ppl(model, ids[:256], 256), rel=1e-5)


def test_errors_and_model_state():
    model = make_tiny("opt")
    model.train()
    with pytest.raises(ValueError, match="tokenizer does not match"):
        perplexity(model, torch.tensor([1, 2, 500, 3]), seqlen=2)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, torch.arange(10), seqlen=16)
    value = perplexity(model, torch.arange(64) % 128, seqlen=16, progress=False)
    assert math.isfinite(value) and model.training  # eval during scoring, mode restored
