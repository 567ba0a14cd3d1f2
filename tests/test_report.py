"""Reports: report.json / report.md contents, PNG plots from report objects and from saved dicts,
tables, and graceful degradation without matplotlib."""

from __future__ import annotations

import json
import math

import pytest
from conftest import make_tiny, tiny_calib

import sdsx
from sdsx import report as rp

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs():
    a = make_tiny("llama", layers=3)
    sds = sdsx.sds_prune(a, tiny_calib(), "2:4", "sparsegpt", progress=False, dense_iters=3, adjust_iters=2)
    b = make_tiny("llama", layers=3)
    sgpt = sdsx.prune(b, tiny_calib(), "sparsegpt", "2:4", progress=False)
    c = make_tiny("llama", layers=3)
    mag = sdsx.prune(c, None, "magnitude", 0.5, progress=False, report_error=False)
    return sds, sgpt, mag


ROWS = [
    {"model": "tiny", "method": "dense", "sparsity": "0", "ppl wikitext2": 130.25, "piqa acc": 0.61234},
    {"model": "tiny", "method": "sds-sparsegpt", "sparsity": "2:4", "ppl wikitext2": 151.5, "piqa acc": 0.55, "prune s": 12.345},
]


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_write_report_files_and_plots(tmp_path, runs):
    sds, sgpt, mag = runs
    written = rp.write_report(tmp_path / "rep", ROWS, [sds, sgpt, mag], meta={"command": "sdsx prune tiny"}, title="tiny run")
    out = tmp_path / "rep"
    assert written["json"] == out / "report.json" and written["md"] == out / "report.md"
    for key in ("errors", "sparsity", "histograms_sds-sparsegpt-2_4", "phases_sds-sparsegpt-2_4"):
        assert is_png(written[key]), key
    # one histogram figure only: the baselines have no phases
    assert sorted(p.name for p in out.glob("histograms_*.png")) == ["histograms_sds-sparsegpt-2_4.png"]
    data = json.loads((out / "report.json").read_text())
    assert data["title"] == "tiny run" and data["rows"][1]["method"] == "sds-sparsegpt"
    assert [r["method"] for r in data["runs"]] == ["sds-sparsegpt", "sparsegpt", "magnitude"]
    assert data["runs"][0]["histograms"]["counts"]["final"]
    assert data["runs"][2]["layers"][0]["error"] is None  # NaN -> null, valid JSON
    assert data["meta"]["command"] == "sdsx prune tiny"
    md = (out / "report.md").read_text()
    assert md.startswith("# tiny run")
    assert "| tiny  | sds-sparsegpt | 2:4      |       151.500 |   0.5500 |    12.3 |" in md
    assert "![errors](layer_errors.png)" in md
    assert "schedule interleaved" in md  # the SDS report's own markdown


def test_plots_from_saved_dicts(tmp_path, runs):
    sds, sgpt, _ = runs
    dicts = [json.loads(json.dumps(rp._json_safe(r.to_dict()))) for r in (sds, sgpt)]  # as read back from sdsx.json
    assert is_png(rp.plot_histograms(dicts[0], tmp_path / "h.png"))
    assert is_png(rp.plot_errors(dicts, tmp_path / "e.png"))
    assert is_png(rp.plot_sparsity(dicts, tmp_path / "s.png"))
    assert is_png(rp.plot_phase_errors(dicts[0], tmp_path / "p.png"))
    assert rp.plot_histograms(dicts[1], tmp_path / "none.png") is None
    assert rp.plot_phase_errors(dicts[1], tmp_path / "none.png") is None
    written = rp.write_report(tmp_path / "d", [], dicts)
    assert "**sds-sparsegpt 2:4**: 21 layers" in written["md"].read_text()


def test_no_error_plot_without_errors(tmp_path, runs):
    _, _, mag = runs
    assert rp.plot_errors([mag], tmp_path / "e.png") is None
    assert is_png(rp.plot_sparsity([mag], tmp_path / "s.png"))


def test_plots_leave_the_pyplot_backend_alone(tmp_path, runs):
    import matplotlib

    before = matplotlib.get_backend()
    rp.plot_errors(runs[:2], tmp_path / "e.png")
    assert matplotlib.get_backend() == before


def test_without_matplotlib_the_text_report_is_still_written(tmp_path, runs, monkeypatch, caplog):
    def missing(*a, **k):
        raise ImportError("plots need matplotlib: pip install matplotlib (or sdsx[plots])")

    monkeypatch.setattr(rp, "_figure", missing)
    with caplog.at_level("WARNING", logger="sdsx"):
        written = rp.write_report(tmp_path / "r", ROWS, list(runs))
    assert set(written) == {"json", "md"}
    assert "plots were skipped" in caplog.text


def test_format_table():
    table = rp.format_table(ROWS)
    lines = table.splitlines()
    assert lines[0] == "| model | method        | sparsity | ppl wikitext2 | piqa acc | prune s |"
    assert lines[1].startswith("|-------|") and lines[1].endswith("--------:|")
    assert "130.250" in lines[2] and "0.6123" in lines[2] and lines[2].endswith("|         |")
    assert rp.format_table([]) == ""
    assert "nan" in rp.format_table([{"x": math.nan}])


def test_zeroshot_table():
    res = {
        "copa": {"acc": 0.6, "acc_stderr": 0.05, "acc_norm": 0.55, "acc_norm_stderr": 0.05, "n": 100, "chance": 0.5},
        "lambada_openai": {"acc": 0.3, "acc_stderr": 0.01, "perplexity": 40.0, "perplexity_stderr": 2.0, "n": 200, "chance": 0.0},
    }
    lines = rp.zeroshot_table(res).splitlines()
    assert lines[0].split("|")[1:-1] == [" task           ", " n   ", " metric     ", " value   ", " stderr ", " chance "]
    assert len(lines) == 2 + 4
    assert "| copa           | 100 | acc_norm   |  0.5500 | 0.0500 | 0.5000 |" in lines
    assert lines[-1].endswith("| perplexity | 40.0000 | 2.0000 |        |")
    assert "perplexity" in lines[-1] and "40.0000" in lines[-1]
