"""Saving and loading pruned models: plain transformers reload with identical outputs and exact
zeros, sdsx.json contents, mask bitmaps, pattern checks on load, output-folder rules."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny, tiny_calib
from test_zeroshot import tiny_tokenizer

import sdsx
from sdsx.io import (
    CHECKPOINT_MARKER,
    MASKS_NAME,
    META_NAME,
    PatternError,
    check_out_dir,
    check_pattern,
    load,
    load_masks,
    save_pruned,
)
from sdsx.model.blocks import get_weight, model_linears, set_weight


def linears(model):
    return model_linears(model)


@pytest.fixture(scope="module")
def pruned_24():
    model = make_tiny("llama")
    report = sdsx.prune(model, tiny_calib(), "sparsegpt", "2:4", progress=False)
    return model, report


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_plain_transformers_reload_is_identical(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = make_tiny(family)
    report = sdsx.prune(model, tiny_calib(), "wanda", "2:4", progress=False)
    out = save_pruned(model, None, tmp_path / "m", report, {"calibration": {"source": "random ids", "nsamples": 8}})
    again = AutoModelForCausalLM.from_pretrained(str(out))
    again.eval()
    for name, module in linears(model).items():
        other = dict(linears(again))[name]
        assert torch.equal(get_weight(module), get_weight(other)), name
        assert torch.equal(get_weight(module) == 0, get_weight(other) == 0)
    x = tiny_calib(2, 24, seed=5)
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    ids = tiny_calib(1, 200, seed=6).reshape(-1)
    a = sdsx.perplexity(model, ids, seqlen=50, progress=False)
    b = sdsx.perplexity(again, ids, seqlen=50, progress=False)
    assert f"{a:.4g}" == f"{b:.4g}" and a == pytest.approx(b, rel=1e-6)


def test_sdsx_json_records_the_run(tmp_path, pruned_24):
    model, report = pruned_24
    tok = tiny_tokenizer()
    out = save_pruned(model, tok, tmp_path / "m", report, {"calibration": {"source": "x.txt", "nsamples": 8, "seqlen": 32}, "note": "hi"})
    meta = json.loads((out / META_NAME).read_text())
    assert meta["method"] == "sparsegpt" and meta["pattern"] == "2:4"
    assert meta["calibration"]["source"] == "x.txt"
    assert set(meta["versions"]) >= {"sdsx", "torch", "transformers"}
    assert meta["versions"]["torch"] == torch.__version__
    names = list(linears(model))
    assert list(meta["layers"]) == names
    assert all(row["sparsity"] >= 0.5 for row in meta["layers"].values())
    assert meta["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert meta["report"]["method"] == "sparsegpt" and len(meta["report"]["layers"]) == len(names)
    assert meta["meta"] == {"note": "hi"}
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    model2, tok2, meta2 = load(out)
    assert tok2 is not None and tok2("The cat")["input_ids"] == tok("The cat")["input_ids"]
    assert meta2["pattern"] == "2:4"


def test_load_detects_a_broken_nm_pattern(tmp_path, pruned_24):
    model, report = pruned_24
    out = save_pruned(model, None, tmp_path / "m", report)
    loaded, _, meta = load(out)
    name, module = next(iter(linears(loaded).items()))
    W = get_weight(module).clone()
    zero = (W[0] == 0).nonzero()[0, 0]
    W[0, zero] = 0.5
    set_weight(module, W)
    loaded.save_pretrained(out)  # the weights change behind sdsx.json's back
    with pytest.raises(PatternError, match=rf"{name} no longer has the 2:4 pattern: row 0"):
        load(out)
    model3, _, _ = load(out, check=False)  # the check can be skipped on purpose
    assert model3 is not None


def test_load_detects_fewer_zeros_unstructured(tmp_path):
    model = make_tiny("opt")
    report = sdsx.prune(model, tiny_calib(), "magnitude", 0.5, progress=False)
    out = save_pruned(model, None, tmp_path / "m", report)
    meta = json.loads((out / META_NAME).read_text())
    assert meta["pattern"] == "0.5"
    load(out)
    name, module = list(linears(model).items())[3]
    W = get_weight(module).clone()
    W[W == 0] = 1e-3  # a fine-tune that revived the pruned weights
    set_weight(module, W)
    with pytest.raises(PatternError, match=rf"{name} holds \d+ zeros, but \d+ were saved"):
        check_pattern(model, meta)


def test_masks_round_trip_and_catch_moved_zeros(tmp_path, pruned_24):
    model, report = pruned_24
    out = save_pruned(model, None, tmp_path / "m", report, save_masks=True)
    assert (out / MASKS_NAME).is_file()
    masks = load_masks(out)
    for name, module in linears(model).items():
        assert torch.equal(masks[name], get_weight(module) != 0)
    # bitmaps: one bit per weight
    assert (out / MASKS_NAME).stat().st_size < sum(m.weight.numel() for m in linears(model).values()) / 8 + 8192
    meta = json.loads((out / META_NAME).read_text())
    # swap a zero and a kept weight inside one group: counts and 2:4 still hold, the mask does not
    loaded, _, _ = load(out)
    name, module = next(iter(linears(loaded).items()))
    W = get_weight(module).clone()
    group = W[0, :4].clone()
    keep = (group != 0).nonzero()[0, 0]
    drop = (group == 0).nonzero()[0, 0]
    W[0, drop], W[0, keep] = group[keep], 0.0
    set_weight(module, W)
    with pytest.raises(PatternError, match=rf"{name}: weight \[0, {int(drop)}\] is nonzero but pruned in the saved mask"):
        check_pattern(loaded, meta, load_masks(out))


def test_sds_report_is_saved(tmp_path):
    model = make_tiny("llama")
    report = sdsx.sds_prune(model, tiny_calib(), "2:4", "wanda", progress=False, dense_iters=2, adjust_iters=2)
    out = save_pruned(model, None, tmp_path / "m", report)
    meta = json.loads((out / META_NAME).read_text())
    assert meta["method"] == "sds-wanda" and meta["pattern"] == "2:4"
    assert set(meta["report"]["histograms"]["counts"]) >= {"dense", "sparse", "final"}
    assert meta["report"]["phase_errors"]
    load(out)


def test_pattern_detected_without_a_report(tmp_path, pruned_24):
    model, _ = pruned_24
    out = save_pruned(model, None, tmp_path / "m")
    assert json.loads((out / META_NAME).read_text())["pattern"] == "2:4"


def test_out_dir_rules(tmp_path):
    assert check_out_dir(tmp_path / "new") == "new"
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty") == "empty"
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty; pass --overwrite"):
        check_out_dir(full)
    assert check_out_dir(full, overwrite=True) == "overwrite"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / CHECKPOINT_MARKER).write_text("{}")
    (ckpt / "block_0.pt").write_text("")
    assert check_out_dir(ckpt) == "checkpoint"
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        check_out_dir(tmp_path / "file")


def test_save_refuses_a_full_folder_and_overwrite_drops_stale_masks(tmp_path, pruned_24):
    model, report = pruned_24
    out = save_pruned(model, None, tmp_path / "m", report, save_masks=True)
    with pytest.raises(FileExistsError):
        save_pruned(model, None, out, report)
    (out / "notes.txt").write_text("kept")
    save_pruned(model, None, out, report, overwrite=True)
    assert not (out / MASKS_NAME).exists()  # a stale mask file would contradict the new save
    assert (out / "notes.txt").read_text() == "kept"  # files that are not ours stay
    assert json.loads((out / META_NAME).read_text())["masks"] is None
    load(out)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="has no sdsx.json: not a model saved by sdsx"):
        load(tmp_path / "plain")
    (tmp_path / "plain" / META_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path / "plain")
