"""Integration: prune the real SmolLM2-135M (few short calibration sequences) and evaluate it."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import sdsx
from sdsx.data import calibration, load_text
from sdsx.model import find_blocks, find_linears, get_weight

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FALLBACK = (
    "The committee met on Tuesday to discuss the budget for the coming year. Members asked how the "
    "new library would be paid for, and the treasurer explained that most of the money would come "
    "from a grant awarded by the state. Several residents spoke in favour of the plan. "
)


def _calib_text() -> str:
    path = DATA / "calib" / "sotu_1990_2021.txt"
    return load_text(path) if path.is_file() else FALLBACK * 60


def _eval_text() -> str:
    path = DATA / "wikitext2" / "wiki.test.raw"
    return load_text(path) if path.is_file() else FALLBACK * 60


def test_smollm2_shape(smollm2):
    model, tokenizer = smollm2
    blocks = find_blocks(model)
    assert blocks.path == "model.layers" and len(blocks.layers) == 30
    assert len(find_linears(blocks.layers[0])) == 7
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


# SparseGPT's solver dominates (about 20 s for the 210 layers at one thread); Wanda without the
# error report needs only diagonal statistics and is cheap.
@pytest.mark.parametrize("method,pattern,report_error", [("sparsegpt", "2:4", True), ("wanda", 0.5, False)])
def test_prune_smollm2(smollm2, method, pattern, report_error):
    base, tokenizer = smollm2
    model = copy.deepcopy(base)
    calib = calibration([_calib_text()], tokenizer, nsamples=4, seqlen=32, seed=0)
    report = sdsx.prune(model, calib, method, pattern, progress=False, report_error=report_error)
    assert len(report.layers) == 30 * 7 and report.overall_sparsity == 0.5
    assert math.isfinite(report.total_error) == report_error
    blocks = find_blocks(model)
    for i, block in enumerate(blocks.layers):
        for name, lin in find_linears(block).items():
            keep = get_weight(lin) != 0
            if pattern == "2:4":
                assert bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) <= 2).all()), f"layer {i} {name}"
            else:
                assert int(keep.sum()) <= keep.numel() // 2
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    text = _eval_text()
    dense = sdsx.perplexity(base, text, tokenizer, seqlen=256, max_windows=1, progress=False)
    pruned = sdsx.perplexity(model, text, tokenizer, seqlen=256, max_windows=1, progress=False)
    assert math.isfinite(pruned) and dense < pruned < 50 * dense
