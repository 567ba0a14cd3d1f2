"""GramAccumulator: H = X X^T / T however the tokens arrive (chunking, dtypes, blocking)."""

import pytest
import torch

from sdsx.stats import GramAccumulator


def _reference(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return (x.t() @ x / x.shape[0]).float()


@pytest.mark.parametrize("columns", [7, 128, 300, 640])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 64, 10_000])
def test_matches_dense_gram_for_any_batching(columns, chunk_tokens):
    g = torch.Generator().manual_seed(columns + chunk_tokens)
    batches = [torch.randn(n, columns, generator=g) for n in (3, 17, 64, 1, 40)]
    acc = GramAccumulator(columns, chunk_tokens=chunk_tokens)
    for b in batches:
        acc.update(b)
    H = acc.finalize()
    ref = _reference(torch.cat(batches))
    assert acc.tokens == sum(b.shape[0] for b in batches)
    torch.testing.assert_close(H, ref, rtol=1e-4, atol=1e-5)
    if columns >= 256:  # the blocked path mirrors its upper triangle: exactly symmetric
        assert torch.equal(H, H.t())


def test_buffer_is_decoupled_from_caller_tensor():
    x = torch.randn(2, 5, 300)
    acc = GramAccumulator(300, chunk_tokens=4096)
    acc.update(x)
    expected = _reference(x)
    x.mul_(100.0)  # the caller reuses its activation buffer before the chunk is flushed
    torch.testing.assert_close(acc.finalize(), expected, rtol=1e-4, atol=1e-5)


def test_half_precision_inputs_accumulate_in_fp32():
    x = torch.randn(50, 260).half()
    acc = GramAccumulator(260, chunk_tokens=16)
    acc.update(x[:20])
    acc.update(x[20:])
    H = acc.finalize()
    assert H.dtype == torch.float32
    torch.testing.assert_close(H, _reference(x.float()), rtol=1e-4, atol=1e-5)


def test_diagonal_only():
    x = torch.randn(33, 40)
    acc = GramAccumulator(40, diag_only=True)
    acc.update(x[:10])
    acc.update(x[10:])
    torch.testing.assert_close(acc.finalize(), (x * x).mean(0))


def test_errors():
    with pytest.raises(ValueError, match="features"):
        GramAccumulator(8).update(torch.randn(3, 9))
    with pytest.raises(RuntimeError, match="no calibration tokens"):
        GramAccumulator(8).finalize()
    with pytest.raises(ValueError, match="chunk_tokens"):
        GramAccumulator(8, chunk_tokens=0)
    acc = GramAccumulator(300, chunk_tokens=64)
    x = torch.randn(10, 300)
    x[3, 7] = float("nan")
    acc.update(x)
    with pytest.raises(FloatingPointError, match="1 of the layer's 300"):
        acc.finalize()


@pytest.mark.parametrize("columns", [40, 300])
def test_finalize_is_final(columns):
    """finalize() turns the running sum into H in place: a second call returns the same H, and
    more inputs are refused instead of silently corrupting it."""
    x = torch.randn(64, columns)
    acc = GramAccumulator(columns, chunk_tokens=16)
    acc.update(x)
    H = acc.finalize()
    assert acc.finalize() is H
    torch.testing.assert_close(H, _reference(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="finalized"):
        acc.update(x)
