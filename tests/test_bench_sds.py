"""bench/sds.py's texts: calibration sources, validation and other text kept apart.

The tokenizer here reads numbers, and every text's tokens are its own positions offset by a
per-text base, so a token id says which text and where it came from."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import load_bench

@pytest.fixture(scope="module")
def bench():
    return load_bench("sds")


def _tok(text: str) -> list[int]:
    return [int(w) for w in text.split()]


@pytest.fixture()
def texts(tmp_path):
    out = {}
    for name, base, length in (("speeches", 0, 4000), ("brown", 100_000, 6000), ("wiki", 200_000, 3000)):
        path = tmp_path / f"{name}.txt"
        path.write_text(" ".join(str(base + i) for i in range(length)))
        out[name] = str(path)
    return out


def _args(texts, **kw) -> argparse.Namespace:
    base = dict(calib=texts["speeches"], val_text=None, other=texts["brown"], holdout=0.15, nsamples=8, seqlen=50,
                eval_seqlen=20, val_windows=5, seed=0)
    return argparse.Namespace(**{**base, **kw})


def test_one_calibration_file_is_the_old_protocol(bench, texts):
    from sdsx.data.calibration import _windows

    calib, val, other, info = bench.build_texts(_args(texts), None, _tok)
    ids = torch.arange(4000)
    assert torch.equal(calib, _windows(ids[:3400], 8, 50, torch.Generator().manual_seed(0), "x"))
    assert torch.equal(val, ids[3400:])
    assert info == dict(val_text=texts["speeches"], other_tail=False)
    # the other text is not a calibration source: windows spread over all of it
    assert other.numel() == 5 * 20 and int(other.min()) == 100_000 and int(other.max()) == 100_000 + 4 * 1200 + 19


def test_a_source_that_is_also_evaluated_calibrates_on_its_head_only(bench, texts):
    calib, val, other, info = bench.build_texts(
        _args(texts, calib=f"{texts['speeches']},{texts['brown']}", val_text=texts["speeches"]), None, _tok
    )
    assert calib.shape == (8, 50) and info["other_tail"] and info["val_text"] == texts["speeches"]
    speech, brown = calib[calib < 100_000], calib[calib >= 100_000]
    assert speech.numel() == brown.numel() == 4 * 50  # split evenly, in source order
    assert bool((calib[:4] < 100_000).all()) and bool((calib[4:] >= 100_000).all())
    assert int(speech.max()) < 3400 and int(brown.max()) < 100_000 + 5100  # heads only
    assert int(val.min()) == 3400 and int(other.min()) >= 100_000 + 5100  # tails only
    # Brown alone: the validation text stays the speeches' tail, nothing of it calibrated on
    calib, val, other, info = bench.build_texts(_args(texts, calib=texts["brown"], val_text=texts["speeches"]), None, _tok)
    assert bool((calib >= 100_000).all()) and int(calib.max()) < 100_000 + 5100
    assert int(val.min()) == 3400 and info["other_tail"]


def test_quality_only_and_base_time_only_exclude_each_other(bench):
    with pytest.raises(SystemExit):
        bench.main(["--quality-only", "--base-time-only"])


def test_refuses_to_run_without_the_extension(bench, monkeypatch, capsys):
    import sdsx

    monkeypatch.setattr(sdsx, "backend_info", lambda: dict(extension_loaded=False, extension_error="ImportError: test"))
    assert bench.main(["--patterns", "2:4"]) == 2
    assert "extension is not loaded (ImportError: test)" in capsys.readouterr().err


def test_calibration_table_groups_by_source_and_size_and_skips_time_only_rows(tmp_path):
    calib = load_bench("sds_calib")
    assert calib.source_label("/d/calib/sotu_1990_2021.txt") == "speeches" and calib.source_label("self") == "self-generated"
    assert calib.source_label("/d/sotu_1990_2021.txt,/d/brown_corpus.txt") == "mixed (speeches + Brown)"

    def write(name, calib_value, nsamples, rows, **meta):
        path = tmp_path / name
        path.write_text(json.dumps(dict(meta=dict(calib=calib_value, nsamples=nsamples, seqlen=512, **meta), rows=rows)))
        return path

    base = dict(method="wanda", pattern="2:4", ppl_val=100.0, ppl_other=200.0, ppl=150.0)
    files = [
        write("a.json", "/d/sotu.txt", 32, [base, dict(method="sds-wanda", pattern="2:4", options={}, ppl_val=50.0, ppl_other=100.0, ppl=120.0)]),
        write("b.json", "/d/sotu.txt", 32, [dict(method="wanda", pattern="2:4", plain_seconds=1.0, time_only=True),
                                           dict(method="sds-wanda", pattern="2:4", options={"l1": 0}, ppl=1.0)]),
        write("c.json", "/d/brown_corpus.txt", 32, [dict(base, ppl=90.0)], other_tail=True),
    ]
    groups = calib.collect(files)
    assert set(groups) == {("speeches", 16384, "2:4"), ("Brown", 16384, "2:4")}
    assert groups[("speeches", 16384, "2:4")]["sds-wanda"]["ppl"] == 120.0  # the ablation row is not SDS's default
    md = calib.to_markdown(groups)
    assert "| 120.00 (-20.0%) |" in md and "| 90.00 |" in md
    assert "| speeches | 16,384 | 2:4 | Wanda | 100.00 | 200.00 |" in md and "| Brown | 16,384 | 2:4 | Wanda | 100.00 | 200.00* |" in md
    pytest.importorskip("matplotlib")
    calib.plot(groups, tmp_path / "calib.png")
    assert (tmp_path / "calib.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_a_holdout_the_library_reads_the_calibration_string(bench, texts):
    from sdsx.data.sources import calibration_from

    args = _args(texts, calib=f"{texts['speeches']},{texts['brown']}", holdout=0.0, other=None)
    calib, val, other, _ = bench.build_texts(args, None, _tok)
    assert val is None and other is None
    assert torch.equal(calib, calibration_from(args.calib, _tok, nsamples=8, seqlen=50, seed=0))


def test_seed_summary_pairs_sds_with_its_base_per_seed(tmp_path):
    table = load_bench("sds_table")

    def write(name, seed, rows):
        path = tmp_path / name
        path.write_text(json.dumps(dict(meta=dict(seed=seed), rows=rows)))
        return path

    def row(method, ppl, **extra):
        return dict(method=method, pattern="2:4", ppl_val=ppl, ppl=2 * ppl, **extra)

    files = [
        write("s0.json", 0, [row("wanda", 100.0), row("sds-wanda", 50.0), row("sds-wanda", 10.0, options={"l1": 0})]),
        write("s1.json", 1, [row("wanda", 200.0), row("sds-wanda", 300.0), row("sds-wanda", 150.0)]),  # the later row counts
        write("s2.json", 2, [row("sds-sparsegpt", 1.0)]),  # no base of its seed: left out
    ]
    summary = table.seed_summary(table.load(files))
    assert [(e["method"], e["seeds"]) for e in summary] == [("sds-wanda", [0, 1])]
    assert summary[0]["metrics"]["ppl"]["change"] == [-50.0, -25.0]
    md = table.seeds_markdown(summary)
    assert "| 2:4 | sds-wanda | 0,1 | 150.00 ± 70.71 | 100.00 ± 70.71 | -50.0%, -25.0% | -37.5% ± 17.7% |" in md
