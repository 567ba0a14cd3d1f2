"""bench/peers.py's pure helpers: pattern mapping, run order, kept positions in common, mask files,
the tables, the plot, and the skip when llm-compressor cannot be imported (no model is run)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_bench

PATH = Path(__file__).resolve().parents[1] / "bench" / "peers.py"


@pytest.fixture(scope="module")
def peers():
    return load_bench("peers")


def test_patterns_map_to_each_librarys_notation(peers):
    assert peers.sdsx_sparsity("2:4") == "2:4" and peers.sdsx_sparsity("0.5") == 0.5
    assert peers.peer_sparsity("2:4") == {"sparsity": 0.5, "mask_structure": "2:4"}
    # sdsx keeps N of M; llm-compressor's mask_structure names the pruned ones
    assert peers.peer_sparsity("1:4") == {"sparsity": 0.75, "mask_structure": "3:4"}
    assert peers.peer_sparsity("0.5") == {"sparsity": 0.5, "mask_structure": "0:0"}
    for bad in ("4:4", "0:4", "1.5", "0"):
        with pytest.raises(ValueError):
            peers.peer_sparsity(bad)
    assert peers.parse_options(["report_error=False", "blocksize=64", "x=none", "name=a", "d=0.01", "ignore=['re:.*lm_head']"]) == {
        "report_error": False, "blocksize": 64, "x": None, "name": "a", "d": 0.01, "ignore": ["re:.*lm_head"]}
    with pytest.raises(ValueError):
        peers.parse_options(["report_error"])


def test_run_order_pairs_back_to_back_and_alternates(peers):
    plan = peers.run_order([0, 1, 2], ["sparsegpt"], ["2:4", "0.5"], ["sdsx", "llmcompressor"])
    assert len(plan) == 12
    pairs = [plan[i : i + 2] for i in range(0, len(plan), 2)]
    for a, b in pairs:  # one configuration and seed, both libraries, adjacent
        assert a[:3] == b[:3] and {a[3], b[3]} == {"sdsx", "llmcompressor"}
    first = {(a[0], a[2]): a[3] for a, _ in pairs}
    for pattern in ("2:4", "0.5"):  # who goes first alternates from seed to seed
        assert [first[(s, pattern)] for s in (0, 1, 2)] in (["sdsx", "llmcompressor", "sdsx"], ["llmcompressor", "sdsx", "llmcompressor"])
    assert first[(0, "2:4")] != first[(0, "0.5")]
    # without the peer: the sdsx rows alone, in the same order
    assert peers.run_order([0, 1], ["wanda"], ["2:4"], ["sdsx"]) == [(0, "wanda", "2:4", "sdsx"), (1, "wanda", "2:4", "sdsx")]


def test_mask_agreement_counts_kept_positions_in_common(peers):
    a = {
        "model.layers.0.mlp.up_proj": torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool),
        "model.layers.1.mlp.up_proj": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool),
        "model.layers.10.self_attn.q_proj": torch.ones(2, 2, dtype=torch.bool),
    }
    b = {k: v.clone() for k, v in a.items()}
    b["model.layers.1.mlp.up_proj"] = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    out = peers.mask_agreement(a, b)
    assert out["per_layer"]["model.layers.0.mlp.up_proj"] == 1.0
    assert out["per_layer"]["model.layers.1.mlp.up_proj"] == 0.5
    assert [blk["block"] for blk in out["per_block"]] == [0, 1, 10]  # by depth, not by name
    assert [blk["common"] for blk in out["per_block"]] == [1.0, 0.5, 1.0]
    assert out["both"] == 4 + 1 + 4 and out["kept_a"] == out["kept_b"] == 10 and out["numel"] == 8 + 4 + 4
    assert out["common"] == pytest.approx(9 / 10)
    # symmetric where one side keeps more (an unstructured threshold with ties)
    c = {"model.layers.0.x": np.array([True, True, False, False])}
    d = {"model.layers.0.x": np.array([True, True, True, False])}
    assert peers.mask_agreement(c, d)["common"] == pytest.approx(2 * 2 / (2 + 3)) == peers.mask_agreement(d, c)["common"]
    assert peers.mask_agreement(c, c)["numel"] == 4
    with pytest.raises(ValueError, match="different layers"):
        peers.mask_agreement(a, {"model.layers.0.mlp.up_proj": a["model.layers.0.mlp.up_proj"]})
    with pytest.raises(ValueError, match="shapes differ"):
        peers.mask_agreement(c, {"model.layers.0.x": np.ones((2, 2), dtype=bool)})
    assert peers.block_of("model.layers.7.mlp.up_proj") == 7 and peers.block_of("lm_head") is None


def test_masks_round_trip_bit_packed(peers, tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {
        "model.layers.0.mlp.down_proj.weight": torch.randn(5, 13, generator=g) * (torch.rand(5, 13, generator=g) > 0.5),
        "model.layers.3.self_attn.k_proj.weight": torch.zeros(3, 7),
    }
    masks = peers.save_masks(weights, tmp_path / "m.npz")
    back = peers.load_masks(tmp_path / "m.npz")
    assert back.keys() == masks.keys() == {"model.layers.0.mlp.down_proj", "model.layers.3.self_attn.k_proj"}
    for name, w in weights.items():
        key = name.removesuffix(".weight")
        assert back[key].dtype == bool and np.array_equal(back[key], (w != 0).numpy())


def _row(peers, lib, seed, ppl, wall, pruning):
    return dict(library=lib, method="sparsegpt", pattern="2:4", seed=seed, status="ok", ppl=ppl, wall_s=wall,
                forward_s=wall - pruning, stats_s=pruning / 2, solver_s=pruning / 2, other_s=0.0, pruning_s=pruning,
                peak_rss_mib=1000.0 if lib == "sdsx" else 1250.0)


def test_summary_and_markdown(peers, tmp_path):
    rows = [
        _row(peers, "sdsx", 0, 150.0, 100.0, 20.0), _row(peers, "llmcompressor", 0, 148.0, 200.0, 80.0),
        _row(peers, "llmcompressor", 1, 152.0, 180.0, 60.0), _row(peers, "sdsx", 1, 154.0, 90.0, 30.0),
        dict(library="sdsx", method="wanda", pattern="0.5", seed=0, status="failed", error="exit 1: boom"),
    ]
    blocks = [{"block": 0, "common": 1.0}, {"block": 1, "common": 0.9}]
    agreement = [dict(method="sparsegpt", pattern="2:4", seed=s, common=c, per_block=blocks, per_layer={}) for s, c in ((0, 0.95), (1, 0.93))]
    (entry,) = peers.summarize(rows, agreement)  # the failed row is left out
    assert entry["libraries"]["sdsx"]["ppl"] == [150.0, 154.0] and entry["ratios"]["seeds"] == [0, 1]
    assert entry["ratios"]["wall_s"] == pytest.approx([0.5, 0.5]) and entry["ratios"]["pruning_s"] == pytest.approx([0.25, 0.5])
    assert entry["ratios"]["peak_rss_mib"] == pytest.approx([0.8, 0.8]) and entry["common_by_block"] == [1.0, 0.9]
    assert peers.mean_sd([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5)) and peers.mean_sd([2.0]) == (2.0, None)
    assert peers.fmt_mean_sd([2.0]) == "2.00" and peers.fmt_mean_sd([0.95, 0.93], pct=True) == "94.00% ± 1.41%"
    meta = {"settings": dict(nsamples=32, seqlen=512, calib="x/sotu.txt", max_windows=32, eval_seqlen=512, threads=1),
            "peer": {"available": False, "reason": "no venv"}, "sdsx": {"version": "0.1.0"}}
    md = peers.to_markdown(meta, rows, agreement)
    assert "llm-compressor not run: no venv" in md
    assert "| sdsx | SparseGPT | 2:4 | 0 | 100.0 |" in md and "| llm-compressor | SparseGPT | 2:4 | 1 | 180.0 |" in md
    assert "| SparseGPT | 2:4 | sdsx | 2 | 152.00 ± 2.83 |" in md
    assert "| SparseGPT | 2:4 | 2 | 0.50 ± 0.00 | 0.38 ± 0.18 | 0.80 ± 0.00 | 94.00% ± 1.41% | 100.00% | 90.00% |" in md
    assert "failed: exit 1: boom" in md and "| Wanda | 50% | 0 |" in md
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| library | method"))
    table = lines[start : lines.index("", start)]
    assert len(table) == 2 + len(rows) and len({line.count("|") for line in table}) == 1  # a failed row has every cell too
    peers.plot_ppl(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # a run whose peak RSS was not measured (None) drops out of the memory ratio and shows blank
    rows[3]["peak_rss_mib"] = None
    (entry,) = peers.summarize(rows, agreement)
    assert entry["ratios"]["peak_rss_mib"] == pytest.approx([0.8]) and entry["ratios"]["wall_s"] == pytest.approx([0.5, 0.5])
    assert "| sdsx | SparseGPT | 2:4 | 1 | 90.0 | 60.0 | 15.0 | 15.0 | 0.0 | 30.0 |  | 154.00 |" in peers.to_markdown(meta, rows, agreement)


def test_peer_missing_is_reported_not_raised(peers, tmp_path):
    assert not peers.probe_peer(None)["available"]
    gone = peers.probe_peer(str(tmp_path / "nope" / "python"))
    assert not gone["available"] and "does not exist" in gone["reason"]
    if importlib.util.find_spec("llmcompressor") is None:  # this environment has no peer: the probe says so
        here = peers.probe_peer(sys.executable)
        assert not here["available"] and "does not import" in here["reason"]


def test_worker_mode_loads_without_sdsx():
    # the peer's environment has no sdsx: the module must import with the standard library alone
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('p', {str(PATH)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(sorted(k for k in ('sdsx', 'torch', 'numpy', 'transformers') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_run_as_a_script_bench_does_not_shadow_installed_packages(monkeypatch):
    """`python bench/peers.py` puts bench/ first on sys.path; bench/kernels.py would then be what
    `import kernels` finds, the probe transformers makes for the PyPI package (it broke the peer's
    worker, which has no sdsx to import). Loading peers.py takes bench/ off sys.path again."""
    monkeypatch.syspath_prepend(str(PATH.parent))
    assert Path(importlib.util.find_spec("kernels").origin).parent == PATH.parent  # the shadowing
    spec = importlib.util.spec_from_file_location("bench_peers_path", PATH)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert all(Path(p or ".").resolve() != PATH.parent for p in sys.path)
    importlib.invalidate_caches()
    found = importlib.util.find_spec("kernels")
    assert found is None or Path(found.origin).parent != PATH.parent


def test_redo_moves_the_named_rows_and_agreements_to_superseded(peers):
    def row(method, pattern, seed, lib="sdsx"):
        return dict(library=lib, method=method, pattern=pattern, seed=seed, status="ok")

    state = dict(
        rows=[row("wanda", "2:4", 0), row("wanda", "0.5", 0), row("wanda", "0.5", 0, "llmcompressor"), row("sparsegpt", "0.5", 0)],
        agreement=[dict(method="wanda", pattern="0.5", seed=0), dict(method="sparsegpt", pattern="0.5", seed=0)],
    )
    assert peers.supersede(state, ["wanda:0.50"], "new select") == 2
    assert [(r["method"], r["pattern"]) for r in state["rows"]] == [("wanda", "2:4"), ("sparsegpt", "0.5")]
    assert state["agreement"] == [dict(method="sparsegpt", pattern="0.5", seed=0)]
    assert len(state["superseded"]) == 3 and all(x["superseded"] == "new select" for x in state["superseded"])
    assert peers.supersede(state, ["wanda:2:4"], "again") == 1 and peers.supersede(state, ["sparsegpt"], "x") == 1
    assert state["rows"] == [] and peers.supersede(state, ["magnitude"], "none") == 0
