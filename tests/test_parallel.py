"""Layer-parallel SDS (schedule "parallel", sdsx.parallel): 1, 2 and 3 ranks (torchrun, gloo, CPU)
give bit-identical weights; a rank that dies fails the run with a message and the folder resumes,
with another number of ranks, to the same weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, make_tiny, tiny_calib

import sdsx
from sdsx.model.blocks import model_linears
from sdsx.parallel import LayerStore, assign_layers, init_distributed, layer_cost
from sdsx.pruners import PruneResult
from sdsx.pruners.sds import LayerCall, SDSOptions, SharedH, sds_layer, sds_tail

JOB = Path(__file__).with_name("dist_job.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, ranks: int, out: str, ckpt: str | None, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDSX_KILL")}
    if kill:
        env["SDSX_KILL_AT"], env["SDSX_KILL_RANK"] = kill[0], str(kill[1])
    args = ["--out", str(tmp / out)] + (["--ckpt", str(tmp / ckpt)] if ckpt else [])
    if ranks == 0:  # a plain process, no process group
        cmd = [sys.executable, str(JOB), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(JOB), "--distributed", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("parallel")
    proc = _launch(tmp, 0, "single.safetensors", None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "single.safetensors"


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_agree_bit_for_bit(single, tmp_path, ranks):
    proc = _launch(tmp_path, ranks, "w.safetensors", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(single, tmp_path / "w.safetensors")
    assert f"'world': {ranks}" in proc.stdout
    assert not (tmp_path / "run" / "parallel").exists()  # the exchange folder is removed after the merge


def test_dead_rank_fails_clearly_and_resumes_with_other_world_size(single, tmp_path):
    # rank 1 is killed (SIGKILL) just before writing its 4th result
    proc = _launch(tmp_path, 3, "w.safetensors", "run", kill=("task:4", 1))
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "another rank failed" in log and "run the same command again" in log, log[-3000:]
    done = list((tmp_path / "run" / "parallel" / "results").glob("*.safetensors"))
    assert 3 <= len(done) < 21  # rank 1's first three survive, and what rank 2 finished
    proc = _launch(tmp_path, 2, "w.safetensors", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished blocks per pass" in proc.stdout + proc.stderr
    assert_same_weights(single, tmp_path / "w.safetensors")


def test_rank0_killed_mid_phase1_resumes(single, tmp_path):
    proc = _launch(tmp_path, 2, "w.safetensors", "run", kill=("layer:10", 0))
    assert proc.returncode != 0
    proc = _launch(tmp_path, 2, "w.safetensors", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(single, tmp_path / "w.safetensors")


# ------------------------------------------------------------------------------ in process
def test_tail_after_phase1_equals_sds_layer():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g)
    X = torch.randn(200, 32, generator=g)
    H = X.t() @ X / 200
    opts = SDSOptions(dense_iters=5, adjust_iters=3)
    whole = sds_layer(W, H, "2:4", opts)
    from sdsx.pruners.sds import prune_once

    s1 = prune_once("sparsegpt", W, H, sdsx.SparsitySpec.parse("2:4"), opts, "layer")
    tail = sds_tail(W, s1, H, "2:4", opts, LayerCall(shared=SharedH(opts)))
    assert torch.equal(whole.result.weight, tail.result.weight)
    assert whole.errors == tail.errors


def test_parallel_schedule_in_process_is_valid_and_reported():
    model = make_tiny("llama", layers=2)
    report = sdsx.sds_prune(model, tiny_calib(nsamples=4, seqlen=24), "2:4", schedule="parallel", dense_iters=4, adjust_iters=2,
                            progress=False)
    assert report.schedule == "parallel" and report.parallel["world"] == 1
    assert report.parallel["ranks"][0]["layers"] == len(report.layers) == 14
    for rec in report.layers:
        assert rec.sparsity == pytest.approx(0.5)
    for name, module in model_linears(model).items():
        W = module.weight.detach()
        assert bool(((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all()), name
    assert set(report.phase_errors) == {r.name for r in report.layers}
    assert "final" in next(iter(report.phase_errors.values()))


def test_assign_layers_balances_and_spares_rank0():
    shapes = {f"l{i}": (64 * (1 + i % 3), 128 * (1 + i % 2)) for i in range(20)}
    assert set(assign_layers(shapes, 1).values()) == {0}
    owners = assign_layers(shapes, 4)
    assert set(owners.values()) == {1, 2, 3}
    load = {r: sum(layer_cost(*shapes[n]) for n, o in owners.items() if o == r) for r in (1, 2, 3)}
    biggest = max(layer_cost(*s) for s in shapes.values())
    assert max(load.values()) - min(load.values()) <= biggest  # the LPT guarantee
    assert owners == assign_layers(dict(reversed(list(shapes.items()))), 4)  # independent of order
    with pytest.raises(ValueError):
        assign_layers(shapes, 0)


def test_store_round_trip(tmp_path):
    store = LayerStore(tmp_path)
    W = torch.randn(8, 12)
    s1 = PruneResult(W * (W.abs() > 0.5), W.abs() > 0.5, 0.25)
    H = torch.eye(12)
    store.write_task("model.layers.0.k_proj", W * 2, s1, H)
    W_d, t1, H1 = store.read_task("model.layers.0.k_proj")
    assert torch.equal(W_d, W * 2) and torch.equal(t1.weight, s1.weight) and torch.equal(t1.mask, s1.mask) and t1.loss == 0.25
    assert torch.equal(H1, H)
    store.drop_task("model.layers.0.k_proj")
    assert not any(store.tasks.iterdir())  # a dropped task leaves nothing behind
    with pytest.raises(FileNotFoundError, match="no phase-1 task"):
        store.read_task("model.layers.9.q_proj")


def test_distributed_needs_torchrun_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        init_distributed()


def test_multi_rank_without_folder_is_refused(monkeypatch):
    import sdsx.parallel as par

    monkeypatch.setattr(par, "dist_info", lambda: (0, 2))
    with pytest.raises(ValueError, match="checkpoint_dir"):
        sdsx.sds_prune(make_tiny("llama", layers=1), tiny_calib(nsamples=2, seqlen=16), "2:4", schedule="parallel", progress=False)
