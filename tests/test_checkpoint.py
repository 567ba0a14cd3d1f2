"""Resumable runs: a run killed (SIGKILL) at chosen points, inside checkpoint writes included, and
then re-run with the same command ends with weights bit-identical to an uninterrupted run; a
checkpoint of another run is refused with what differs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, make_tiny, tiny_calib

import sdsx
from sdsx.checkpoint import MANIFEST, Checkpoint, CheckpointMismatch

JOB = Path(__file__).with_name("resume_job.py")


def _run(args: list[str], kill_at: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SDSX_KILL_AT", None)
    if kill_at:
        env["SDSX_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, str(JOB), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """Uninterrupted runs (no checkpoint) of each job kind, made once."""
    root = tmp_path_factory.mktemp("baseline")
    out = {}
    for kind in ("sparsegpt", "sds", "sdsval", "phased", "fit"):
        path = root / f"{kind}.safetensors"
        proc = _run(["--kind", kind, "--out", str(path)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[kind] = path
    return out


# kill points: SDSX_KILL_AT=<event>:<n> kills at the n-th such event of that process; "layer" is
# just before a linear's layer function (mid-block), "write" is halfway through writing a
# checkpoint file (block weights, activations or the manifest). Each scenario kills the run
# several times in a row, resuming after each kill.
SCENARIOS = [
    ("sparsegpt", "auto", ["layer:3", "write:2", "layer:9"]),
    ("sparsegpt", "no", ["write:4", "layer:12"]),  # inputs recomputed from the restored blocks
    ("sds", "auto", ["layer:8", "write:3", "write:1"]),
    ("sdsval", "auto", ["layer:9", "write:3"]),
    ("sdsval", "no", ["write:2", "layer:14"]),  # the main inputs recomputed, the validation streams restored
    ("phased", "auto", ["layer:5", "write:6", "layer:20", "layer:2"]),
    ("fit", "no", ["write:2", "layer:9"]),  # the fit's dense stream and the validation streams restored
]


@pytest.mark.parametrize("kind,activations,kills", SCENARIOS, ids=[f"{s[0]}-{s[1]}" for s in SCENARIOS])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, baselines, kind, activations, kills):
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "final.safetensors"
    args = ["--kind", kind, "--ckpt", str(ckpt), "--out", str(out), "--activations", activations]
    for point in kills:
        proc = _run(args, kill_at=point)
        assert proc.returncode == -signal.SIGKILL, f"kill point {point} was not reached: rc={proc.returncode}\n{proc.stderr[-2000:]}"
        assert not out.exists()
        assert (ckpt / MANIFEST).is_file()
        json.loads((ckpt / MANIFEST).read_text())  # never left half-written
    proc = _run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restored from the checkpoint" in proc.stderr
    assert_same_weights(out, baselines[kind])


def test_kill_at_random_times_then_resume(tmp_path, baselines):
    """SIGKILL from outside after a random delay (wherever the run happens to be), twice."""
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "final.safetensors"
    args = [sys.executable, str(JOB), "--kind", "sds", "--ckpt", str(ckpt), "--out", str(out)]
    rng = random.Random(1234)
    for _ in range(2):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # import alone takes seconds; aim the kill into the pruning
        deadline = time.monotonic() + 120
        while not (ckpt / MANIFEST).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    done = _run(["--kind", "sds", "--ckpt", str(ckpt), "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(out, baselines["sds"])


def test_finished_checkpoint_restores_without_pruning(tmp_path):
    """Re-running a finished run restores every block (the layer function is never called)."""
    model = make_tiny("llama", layers=2)
    calib = tiny_calib()
    report = sdsx.prune(model, calib, "sparsegpt", "2:4", progress=False, checkpoint_dir=tmp_path)
    again = make_tiny("llama", layers=2)
    report2 = sdsx.prune(again, calib, "sparsegpt", "2:4", progress=False, checkpoint_dir=tmp_path)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r.name for r in report2.layers] == [r.name for r in report.layers]
    assert [r.error for r in report2.layers] == [r.error for r in report.layers]
    assert report2.solver_s == pytest.approx(report.solver_s)


@pytest.mark.parametrize(
    "change,needle",
    [
        (dict(sparsity="4:8"), "sparsity='2:4' there, '4:8' now"),
        (dict(method="wanda"), "method='sparsegpt' there, 'wanda' now"),
        (dict(seed=1), "the model differs"),
        (dict(calib_seed=1), "the calibration differs"),
        (dict(percdamp=0.1), "percdamp=0.01 there, 0.1 now"),
    ],
)
def test_foreign_checkpoint_is_refused(tmp_path, change, needle):
    model = make_tiny("llama", layers=2)
    sdsx.prune(model, tiny_calib(), "sparsegpt", "2:4", progress=False, checkpoint_dir=tmp_path)
    other = make_tiny("llama", layers=2, seed=change.get("seed", 0))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    kwargs = {"percdamp": change["percdamp"]} if "percdamp" in change else {}
    with pytest.raises(CheckpointMismatch, match="belongs to another run") as info:
        sdsx.prune(
            other, tiny_calib(seed=change.get("calib_seed", 0)), change.get("method", "sparsegpt"),
            change.get("sparsity", "2:4"), progress=False, checkpoint_dir=tmp_path, **kwargs,
        )
    assert needle in str(info.value)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although the checkpoint was refused"


def test_corrupt_block_file_is_detected(tmp_path):
    model = make_tiny("llama", layers=2)
    sdsx.prune(model, tiny_calib(), "wanda", 0.5, progress=False, checkpoint_dir=tmp_path)
    block = sorted((tmp_path / "checkpoint").glob("*-block-00000.safetensors"))[0]
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF
    block.write_bytes(bytes(data))
    with pytest.raises(CheckpointMismatch, match="corrupt"):
        sdsx.prune(make_tiny("llama", layers=2), tiny_calib(), "wanda", 0.5, progress=False, checkpoint_dir=tmp_path)


def test_remove_and_orphaned_temporaries(tmp_path):
    ckpt = Checkpoint.open(tmp_path / "c", {"model": "a", "calibration": "b", "options": {}})
    (ckpt.files / "x.safetensors.tmp").write_bytes(b"partial")
    ckpt = Checkpoint.open(tmp_path / "c", {"model": "a", "calibration": "b", "options": {}})
    assert not list(ckpt.files.glob("*.tmp"))
    ckpt.remove()
    assert not (tmp_path / "c").exists()
