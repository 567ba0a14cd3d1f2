"""bench/sds.py's texts: calibration sources, validation and other text kept apart.

The tokenizer here reads numbers, and every text's tokens are its own positions offset by a
per-text base, so a token id says which text and where it came from."""

from __future__ import annotations

import argparse
import json

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
                eval_seqlen=20, val_windows=5, seed=0, bos="never")
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


def test_zeroshot_scores_keep_per_item_correctness(bench, tmp_path):
    """--zeroshot's row entry on a tiny model: accuracies as zero_shot gives them, and the per-item
    '0'/'1' string (the prediction is the gold choice; for LAMBADA the greedy hit)."""
    from conftest import make_tiny

    from sdsx.eval.zeroshot import zero_shot

    model = make_tiny("llama", seed=4)
    ctx = [5, 17, 42, 9]
    with torch.no_grad():
        word = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    choice = [{"query": "1 2 3", "choices": ["4 5", "6"], "gold": 0}, {"query": "7 8", "choices": ["9", "10 11", "12"], "gold": 2},
              {"query": "13", "choices": ["14 15 16", "17"], "gold": 1}]
    greedy = [{"context": " ".join(map(str, ctx)), "continuation": str(word)}, {"context": "20 21 22", "continuation": "23"}]
    for name, items in (("piqa", choice), ("lambada_openai", greedy)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    got = bench.zeroshot_scores(model, _tok, ["piqa", "lambada_openai"], batch_size=2, data_dir=tmp_path)
    ref = zero_shot(model, _tok, ["piqa", "lambada_openai"], data_dir=tmp_path, progress=False, log_samples=True)
    assert set(got) == {"piqa", "lambada_openai"}
    assert set(got["piqa"]) == {"acc", "acc_stderr", "n", "acc_norm", "acc_norm_stderr", "correct"}
    assert set(got["lambada_openai"]) == {"acc", "acc_stderr", "n", "perplexity", "correct"}
    for task, res in got.items():
        assert res["acc"] == pytest.approx(ref[task]["acc"]) and res["n"] == len(res["correct"]) == ref[task]["n"]
        assert res["correct"].count("1") == round(res["acc"] * res["n"])
    assert got["piqa"]["correct"] == "".join(str(int(s["pred"] == s["gold"])) for s in ref["piqa"]["samples"])
    assert got["lambada_openai"]["correct"][0] == "1"  # the model's own argmax is its greedy continuation
    assert got["lambada_openai"]["perplexity"] == pytest.approx(ref["lambada_openai"]["perplexity"])
    meta = {"nsamples": 8, "seqlen": 50, "calib": "c.txt", "eval": "WikiText-2 test", "eval_tokens": 100, "eval_seqlen": 20,
            "threads": 1, "schedule": "interleaved", "zeroshot": {"tasks": ["piqa"], "limit": 3}}
    md = bench.to_markdown(meta, [{"method": "dense", "pattern": "-", "seconds": 0.0, "zeroshot": got}])
    assert "Zero-shot accuracy (first 3 items per task" in md and "| dense | - |  | " in md


@pytest.mark.parametrize("argv, message", [
    (["--zeroshot", "nosuchtask"], "unknown task"),
    (["--zeroshot", "piqa", "--zs-limit", "0"], "--zs-limit must be a positive count"),
    (["--zeroshot", "piqa", "--zs-batch", "0"], "--zs-batch must be a positive count"),
])
def test_zeroshot_arguments_are_checked_before_any_work(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_mcnemar_exact_test():
    table = load_bench("sds_table")
    assert table.mcnemar("1100", "1100") == (0.0, 1.0)  # no discordant item
    diff, p = table.mcnemar("1" * 10 + "0" * 5, "0" * 10 + "0" * 5)  # 10 discordant, all for the first
    assert diff == pytest.approx(10 / 15) and p == pytest.approx(2 * 0.5**10)
    diff, p = table.mcnemar("0" * 10, "1" * 10)
    assert diff == -1.0 and p == pytest.approx(2 * 0.5**10)
    # 3 discordant one way, 1 the other: 2 * P[X <= 1], X ~ Bin(4, 1/2) = 2 * 5/16
    diff, p = table.mcnemar("1110" + "11", "0001" + "11")
    assert diff == pytest.approx(2 / 6) and p == pytest.approx(10 / 16)
    assert table.mcnemar("10", "01")[1] == 1.0  # balanced: capped at 1
    # many discordant pairs: exact integers, no underflow or overflow
    diff, p = table.mcnemar("1" * 3000 + "0" * 2000, "0" * 3000 + "1" * 2000)
    assert diff == pytest.approx(0.2) and 0.0 < p < 1e-30
    for a, b in (("10", "1"), ("", ""), ("12", "10")):
        with pytest.raises(ValueError):
            table.mcnemar(a, b)


def test_table_pairs_zeroshot_with_the_base(tmp_path):
    table = load_bench("sds_table")

    def write(name, seed, rows):
        path = tmp_path / name
        path.write_text(json.dumps({"meta": {"seed": seed}, "rows": rows}))
        return path

    def row(method, ppl, correct):
        acc = correct.count("1") / len(correct)
        zs = {"piqa": {"acc": acc, "acc_stderr": 0.05, "n": len(correct), "correct": correct}}
        return {"method": method, "pattern": "2:4", "ppl_val": ppl, "ppl": 2 * ppl, "zeroshot": zs}

    files = [
        write("s0.json", 0, [row("wanda", 100.0, "0" * 10 + "1" * 10), row("sds-wanda", 50.0, "1" * 20),
                             {"method": "sparsegpt", "pattern": "2:4", "ppl_val": 1.0, "ppl": 2.0}]),  # a row without zero-shot
        write("s1.json", 1, [row("wanda", 200.0, "1" * 20), row("sds-wanda", 100.0, "1" * 19 + "0")]),
    ]
    rows = table.load(files)
    md = table.to_markdown(rows)
    assert "| piqa acc |" in md.splitlines()[0]
    assert "| 50.0 ± 5.0 |" in md  # the base: accuracy ± standard error in points
    assert f"| 100.0 ± 5.0 (+50.0, p={2 * 0.5**10:.2g}) |" in md  # SDS: difference and McNemar p against the base
    assert "| 95.0 ± 5.0 (-5.0, p=1) |" in md
    summary = table.seed_summary(rows)
    z = summary[0]["zeroshot"]["piqa"]
    assert z["seeds"] == [0, 1] and z["change"] == [50.0, -5.0] and z["p"] == [pytest.approx(2 * 0.5**10), 1.0]
    md = table.seeds_markdown(summary)
    assert "| 2:4 | sds-wanda | piqa | 0,1 | 75.0 ± 35.4 | 97.5 ± 3.5 | +50.0 (p=0.002), -5.0 (p=1) | 22.5 ± 38.9 |" in md
