"""Layer-parallel SDS: phase 1 sequential on rank 0, phases 2 and 3 spread over torch.distributed ranks.

Why this split. Phase 1 (one-shot pruning) is sequential by nature: block k's inputs are block
k-1's outputs after it is pruned. Once a layer is pruned, though, the rest of SDS for it (re-dense,
prune again, adjust: :func:`sdsx.pruners.sds.sds_tail`) needs only three tensors: the dense
weight W_d, phase 1's weights and H = X X^T / T of its inputs in the phase-1-pruned model (the
paper's X for the re-dense step). No other layer's result enters it, so the layers of the whole
model can be worked on at once, on as many ranks as there are.

The "parallel" schedule therefore propagates phase 1's outputs from block to block (the phase-2/3
weights of a block never feed the next block, unlike the "interleaved" schedule), and:

* rank 0 runs the block-sequential driver (phase 1) and, after every block, writes a *task* per
  linear (W_d, phase-1 weight and mask, H of its input) to the run's folder, then tells the ranks that own those layers that block k is ready (a point-to-point
  message; rank 0 never waits for them, so phase 1 and phases 2/3 overlap);
* ranks 1..N-1 own the layers, assigned up front by longest-processing-time on the estimated cost
  (out x in^2 + in^3); each writes a *result* per layer (final weights, mask, phase errors);
* rank 0 gathers the ranks' timings, reads every result and writes the final weights into the model.

With one process (no process group, or a group of one) the same schedule runs each layer's phases
2/3 right after its phase 1, in memory. The arithmetic per layer is the same function on the same
tensors either way, so 1, 2 or N ranks give bit-identical weights at the same thread count.

Data travels through files (the checkpoint folder), control through torch.distributed (gloo is
enough: the messages are a few integers). That makes every finished layer durable: a run that
dies (any rank) resumes from the folder with any number of ranks, redoing only unfinished layers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdsx.checkpoint import atomic_save_tensors, fault_point
from sdsx.pruners.base import PruneResult
from sdsx.pruners.sds import LayerCall, SDSLayerResult, SDSOptions, SharedH, sds_tail
from sdsx.pruners.spec import SparsitySpec

log = logging.getLogger("sdsx")

__all__ = ["DistributedRunError", "LayerStore", "ParallelStats", "assign_layers", "dist_info", "init_distributed", "worker"]

WORK_SUBDIR = "parallel"
_DONE = -1


class DistributedRunError(RuntimeError):
    """Another rank of a distributed run died or left; the message says where the work is saved."""


# ------------------------------------------------------------------------------ process group
def dist_info() -> tuple[int, int]:
    """(rank, world size) of the default torch.distributed group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend: str = "gloo", timeout_s: float = 24 * 3600) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); returns (rank, world size).

    The control messages are a few integers, so gloo serves CPU and GPU runs alike. The timeout is
    long because rank 0 legitimately waits for the other ranks' last layers, which may take hours
    on a large model; a rank that dies is still noticed at once (its connections close).
    """
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedRunError(
            f"--distributed needs the process-group environment that torchrun sets ({', '.join(missing)} missing): "
            "launch with `torchrun --nproc-per-node N -m sdsx prune ... --distributed`"
        )
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def install_stop_message(directory: str | os.PathLike) -> None:
    """When torchrun stops this rank because another one failed (SIGTERM), say so and how to resume
    instead of dying silently."""
    rank, world = dist_info()

    def handler(signum: int, frame: Any) -> None:
        log.error(
            "rank %d of %d stopped by the launcher (signal %d): another rank failed. The finished layers are saved "
            "in %s; run the same command again (with any number of ranks) to resume", rank, world, signum, directory,
        )
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------------------------- the plan
def layer_cost(rows: int, cols: int) -> float:
    """Estimated work of phases 2/3 of one (rows, cols) layer: the FISTA and adjustment GEMMs
    (rows x cols^2 each) plus the second SparseGPT factorisation (cols^3)."""
    return float(rows) * cols * cols + float(cols) ** 3


def assign_layers(shapes: dict[str, tuple[int, int]], world: int) -> dict[str, int]:
    """Owner rank of every layer. One rank: rank 0 does all. More: rank 0 runs phase 1 (the
    sequential critical path) and ranks 1..N-1 share phases 2/3 by longest processing time first
    (each layer, largest first, to the least-loaded rank; ties by rank). Deterministic."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if world == 1:
        return {name: 0 for name in shapes}
    load = {r: 0.0 for r in range(1, world)}
    owners: dict[str, int] = {}
    order = sorted(shapes, key=lambda n: (-layer_cost(*shapes[n]), n))
    for name in order:
        rank = min(load, key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += layer_cost(*shapes[name])
    return {name: owners[name] for name in shapes}


# -------------------------------------------------------------------------------- the store
def _safe(name: str) -> str:
    return name.replace("/", "_")


class LayerStore:
    """Tasks (phase-1 output) and results (phase-2/3 output) per layer under ``directory/parallel``.

    Every file is written atomically (temporary name, fsync, rename), so a file that exists is
    complete: a result's presence is the record that the layer is done.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.root = Path(directory).expanduser() / WORK_SUBDIR
        self.tasks = self.root / "tasks"
        self.results = self.root / "results"
        for d in (self.tasks, self.results):
            d.mkdir(parents=True, exist_ok=True)
            for tmp in d.glob("*.tmp"):
                tmp.unlink(missing_ok=True)

    # tasks
    def _task(self, name: str) -> Path:
        return self.tasks / f"{_safe(name)}.safetensors"

    def write_task(self, name: str, W_d: torch.Tensor, s1: PruneResult, H: torch.Tensor) -> None:
        """Phase 1's output for ``name``, with its H: a task is self-contained, so deleting it once
        its result exists frees everything it held (linears that share an input each carry a copy:
        that costs traffic, but no file outlives the layers that need it)."""
        atomic_save_tensors(
            self._task(name),
            {"W_d": W_d, "weight": s1.weight.float(), "mask": s1.mask, "H": H.float(),
             "loss": torch.tensor(float(s1.loss), dtype=torch.float64)},
        )

    def read_task(self, name: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, PruneResult, torch.Tensor]:
        """(W_d, phase-1 result, H) of ``name``."""
        from safetensors.torch import load_file

        path = self._task(name)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no phase-1 task in {self.tasks}; the run folder is incomplete")
        t = load_file(str(path), device=str(device))
        return t["W_d"], PruneResult(t["weight"], t["mask"], float(t["loss"])), t["H"]

    # results
    def _result(self, name: str) -> Path:
        return self.results / f"{_safe(name)}.safetensors"

    def has_result(self, name: str) -> bool:
        return self._result(name).is_file()

    def write_result(self, name: str, res: SDSLayerResult, seconds: float) -> None:
        tensors = {"weight": res.result.weight, "mask": res.result.mask}
        tensors.update({f"snap.{k}": v for k, v in (res.weights or {}).items()})
        meta = {"errors": res.errors, "kept": res.kept_phase1, "loss": float(res.result.loss), "seconds": seconds}
        atomic_save_tensors(self._result(name), tensors, metadata={"record": json.dumps(meta)})

    def read_result(self, name: str) -> SDSLayerResult:
        from safetensors import safe_open

        with safe_open(str(self._result(name)), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})["record"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        snaps = {k[len("snap."):]: v for k, v in t.items() if k.startswith("snap.")}
        return SDSLayerResult(PruneResult(t["weight"], t["mask"], meta["loss"]), meta["errors"], meta["kept"], snaps or None)

    def drop_task(self, name: str) -> None:
        self._task(name).unlink(missing_ok=True)

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------------- the work
@dataclass
class ParallelStats:
    """Per rank: layers done now (not restored), busy seconds in phases 2/3, idle seconds waiting
    for phase 1, and the wall-clock span of its phase-2/3 work."""

    world: int = 1
    ranks: list[dict[str, float]] = field(default_factory=list)

    @property
    def phase23_wall_s(self) -> float:
        """From the first rank's first layer to the last rank's last one (0 when nothing ran)."""
        spans = [(r["first"], r["last"]) for r in self.ranks if r.get("layers")]
        return max(b for _, b in spans) - min(a for a, _ in spans) if spans else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"world": self.world, "phase23_wall_s": self.phase23_wall_s, "ranks": self.ranks}


class Clock:
    def __init__(self, rank: int) -> None:
        self.rank, self.layers, self.busy, self.first, self.last = rank, 0, 0.0, 0.0, 0.0

    def add(self, t0: float, t1: float) -> None:
        if not self.layers:
            self.first = t0
        self.layers += 1
        self.busy += t1 - t0
        self.last = t1

    def as_dict(self) -> dict[str, float]:
        """Rank 0's entry of :class:`ParallelStats` (it never waits for phase 1: idle 0)."""
        return {"rank": self.rank, "layers": self.layers, "busy_s": self.busy, "idle_s": 0.0, "first": self.first, "last": self.last}


def run_task(store: LayerStore, name: str, spec: SparsitySpec, opts: SDSOptions, keep_weights: bool) -> tuple[float, float]:
    """Phases 2/3 of one stored layer; writes its result and deletes the task. Returns (start, end)
    wall times."""
    t0 = time.time()
    W_d, s1, H = store.read_task(name)
    res = sds_tail(W_d, s1, H, spec, opts, LayerCall(name, keep_weights, SharedH(opts)))
    t1 = time.time()
    fault_point("task")
    store.write_result(name, res, t1 - t0)
    store.drop_task(name)
    return t0, t1


def worker(directory: str | os.PathLike | None = None) -> ParallelStats | None:
    """The loop of ranks 1..N-1: receive the run's plan from rank 0, then for every block rank 0
    announces, do the owned layers of that block; finally report the timings to rank 0.

    ``directory`` is only checked against rank 0's (the plan names the folder). Returns None.
    """
    import torch.distributed as dist

    rank, world = dist_info()
    if world < 2 or rank == 0:
        raise RuntimeError("sdsx.parallel.worker() runs on ranks 1..N-1 of a process group of N >= 2")
    plan = [None]
    dist.broadcast_object_list(plan, src=0)
    cfg = plan[0]
    if directory is not None and Path(directory).expanduser().resolve() != Path(cfg["directory"]).resolve():
        raise RuntimeError(f"rank {rank}: folder {directory} differs from rank 0's {cfg['directory']}; give every rank the same --out")
    store = LayerStore(cfg["directory"])
    spec = SparsitySpec.parse(cfg["spec"])
    opts = SDSOptions(**cfg["options"]).validate()
    mine: dict[int, list[str]] = {}
    for name, owner in cfg["owners"].items():
        if owner == rank:
            mine.setdefault(cfg["blocks"][name], []).append(name)
    clock, idle = Clock(rank), 0.0
    signal_ = torch.zeros(1, dtype=torch.int64)
    try:
        while True:
            t0 = time.time()
            dist.recv(signal_, src=0)
            idle += time.time() - t0
            block = int(signal_.item())
            if block == _DONE:
                break
            for name in mine.get(block, []):
                if store.has_result(name):
                    continue
                clock.add(*run_task(store, name, spec, opts, name == cfg["histogram_layer"]))
        report = torch.tensor([clock.layers, clock.busy, idle, clock.first, clock.last], dtype=torch.float64)
        dist.send(report, dst=0)
    except RuntimeError as exc:
        raise DistributedRunError(
            f"rank {rank}: lost contact with rank 0 ({exc}); the finished layers are saved in {cfg['directory']}: "
            "run the same command again to resume"
        ) from exc
    log.info("rank %d: %d layers, %.1fs busy, %.1fs waiting for phase 1", rank, clock.layers, clock.busy, idle)
    return None


class Coordinator:
    """Rank 0's side: the plan broadcast, per-block announcements and the final gather."""

    def __init__(self, directory: Path | None, spec: SparsitySpec, opts: SDSOptions, shapes: dict[str, tuple[int, int]],
                 blocks: dict[str, int], histogram_layer: str) -> None:
        self.rank, self.world = dist_info()
        self.directory = directory
        self.owners = owners = assign_layers(shapes, self.world)
        self.pending: list[Any] = []
        self.signals: list[torch.Tensor] = []
        self.announced: set[int] = set()
        if self.world > 1:
            import torch.distributed as dist

            plan = [{"directory": str(Path(directory).resolve()), "spec": str(spec), "options": opts.to_dict(),
                     "owners": owners, "blocks": blocks, "histogram_layer": histogram_layer}]
            dist.broadcast_object_list(plan, src=0)

    def _fail(self, what: str, exc: BaseException) -> DistributedRunError:
        return DistributedRunError(
            f"{what} failed ({exc}): another rank of the distributed SDS run died or left. The finished layers are "
            f"saved in {self.directory}: run the same command again (with any number of ranks) to resume"
        )

    def announce(self, block: int) -> None:
        """Tell every other rank that ``block``'s tasks are on disk (non-blocking sends)."""
        if self.world == 1 or block in self.announced:
            return
        import torch.distributed as dist

        self.announced.add(block)
        for r in range(1, self.world):
            t = torch.tensor([block], dtype=torch.int64)
            self.signals.append(t)  # must stay alive until the send completes
            try:
                self.pending.append(dist.isend(t, dst=r))
            except RuntimeError as exc:
                raise self._fail(f"announcing block {block} to rank {r}", exc) from exc

    def finish(self) -> list[dict[str, float]]:
        """Send the end signal, wait for every rank and return their timings."""
        if self.world == 1:
            return []
        import torch.distributed as dist

        out = []
        try:
            for r in range(1, self.world):
                t = torch.tensor([_DONE], dtype=torch.int64)
                self.signals.append(t)
                self.pending.append(dist.isend(t, dst=r))
            for r in range(1, self.world):
                rep = torch.zeros(5, dtype=torch.float64)
                dist.recv(rep, src=r)
                layers, busy, idle, first, last = rep.tolist()
                out.append({"rank": r, "layers": int(layers), "busy_s": busy, "idle_s": idle, "first": first, "last": last})
            for req in self.pending:
                req.wait()
        except RuntimeError as exc:
            raise self._fail("waiting for the other ranks", exc) from exc
        self.pending.clear()
        self.signals.clear()
        return out
