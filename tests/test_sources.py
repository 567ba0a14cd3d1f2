"""Mixed calibration sources and calibration sampled from the model itself."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_tiny

import sdsx
from sdsx.data.sources import calibration_from, mixed_calibration, self_calibration, split_count


def _tok(text: str) -> list[int]:
    return [ord(c) % VOCAB for c in text]


def _files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha beta gamma delta " * 40)
    b.write_text("0123456789 " * 60)
    return a, b


def test_split_count():
    assert split_count(7, 3) == [3, 2, 2]
    assert split_count(6, 3) == [2, 2, 2]
    with pytest.raises(ValueError):
        split_count(3, 0)


def test_mixed_sources_take_even_shares_each_with_its_own_seed(tmp_path):
    a, b = _files(tmp_path)
    ids = mixed_calibration([a, b], _tok, nsamples=5, seqlen=8, seed=3)
    assert ids.shape == (5, 8)
    assert torch.equal(ids[:3], sdsx.calibration(a, _tok, nsamples=3, seqlen=8, seed=3))
    assert torch.equal(ids[3:], sdsx.calibration(b, _tok, nsamples=2, seqlen=8, seed=4))
    # the CLI's comma form gives the same windows
    assert torch.equal(calibration_from(f"{a},{b}", _tok, nsamples=5, seqlen=8, seed=3), ids)
    with pytest.raises(ValueError, match="at least 2 windows"):
        mixed_calibration([a, b], _tok, nsamples=1, seqlen=8)


class _Tok:
    bos_token_id = 1


def test_self_calibration_is_seeded_cached_and_starts_with_bos(tmp_path, monkeypatch):
    model = make_tiny("llama")
    ids = self_calibration(model, _Tok(), nsamples=3, seqlen=10, seed=5, batch_size=2, cache=tmp_path, progress=False)
    assert ids.shape == (3, 10) and ids.dtype == torch.long
    assert (ids[:, 0] == 1).all()
    assert int(ids.max()) < VOCAB and ids[:, 1:].unique().numel() > 3  # sampled, not a constant
    again = self_calibration(model, _Tok(), nsamples=3, seqlen=10, seed=5, batch_size=2, cache=False, progress=False)
    assert torch.equal(ids, again)  # the seed fixes the sample
    other = self_calibration(model, _Tok(), nsamples=3, seqlen=10, seed=6, cache=False, progress=False)
    assert not torch.equal(ids, other)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def boom(*a, **k):
        raise AssertionError("the cached sample must be reused, not regenerated")

    monkeypatch.setattr(model, "forward", boom)
    cached = self_calibration(model, _Tok(), nsamples=3, seqlen=10, seed=5, cache=tmp_path, progress=False)
    assert torch.equal(cached, ids)


def test_self_calibration_without_bos_and_errors():
    model = make_tiny("opt")
    ids = self_calibration(model, None, nsamples=2, seqlen=6, seed=0, cache=False, progress=False)
    assert ids.shape == (2, 6)
    with pytest.raises(ValueError, match="model="):
        calibration_from("self", _tok, None, nsamples=2, seqlen=6)
    with pytest.raises(ValueError, match="temperature"):
        self_calibration(model, None, nsamples=2, seqlen=6, temperature=0, cache=False)


def _positions(text: str) -> list[int]:
    """Token i is i: a window's ids say where in the text it was cut."""
    return list(range(len(text)))


def test_holdout_keeps_windows_off_the_tail_that_held_out_returns(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("x" * 1000)
    ids = sdsx.calibration(a, _positions, nsamples=200, seqlen=10, seed=0, holdout=0.25)
    assert int(ids.max()) < 750  # no window reaches into the last 25%
    assert int(ids.max()) > 700  # and the head is used up to its end
    tail = sdsx.data.held_out(a, _positions, 0.25)
    assert torch.equal(tail, torch.arange(750, 1000))
    # holdout=0 is the plain protocol, whatever the seed
    assert torch.equal(sdsx.calibration(a, _positions, 5, 10, seed=2, holdout=0.0), sdsx.calibration(a, _positions, 5, 10, seed=2))
    for bad in (-0.1, 1.0, "0.2"):
        with pytest.raises(ValueError, match="holdout"):
            sdsx.calibration(a, _positions, 5, 10, holdout=bad)
    with pytest.raises(ValueError, match="holdout > 0"):
        sdsx.data.held_out(a, _positions, 0.0)
    with pytest.raises(ValueError, match="first 10% of"):
        sdsx.calibration(a, _positions, 5, 200, holdout=0.9)  # 100 head tokens for a 200-token window


def test_mixed_holdout_per_source(tmp_path):
    a, b = _files(tmp_path)
    ids = mixed_calibration([a, b], _positions, nsamples=40, seqlen=8, seed=3, holdout=[0.5, 0.0])
    assert torch.equal(ids[:20], sdsx.calibration(a, _positions, 20, 8, seed=3, holdout=0.5))
    assert torch.equal(ids[20:], sdsx.calibration(b, _positions, 20, 8, seed=4))
    assert int(ids[:20].max()) < len(a.read_text()) // 2
    with pytest.raises(ValueError, match="one per source"):
        mixed_calibration([a, b], _positions, nsamples=4, seqlen=8, holdout=[0.1])
