"""Resumable runs: a checkpoint folder the block-sequential driver writes after every block.

Layout of a checkpoint folder (the ``--out`` folder of the command line, or ``checkpoint_dir=``):

    sdsx-checkpoint.json        the manifest: fingerprints, and per pass the finished blocks
    checkpoint/<pass>-block-00003.safetensors       block 3's state after the pass (its weights)
    checkpoint/<pass>-act-00003.safetensors         the next block's inputs after block 3 (optional)

Every file is written to a temporary name, flushed to disk and renamed into place; the manifest
is written last and names each file with its SHA-256. A kill at any point therefore leaves either
the previous manifest (and maybe an orphaned temporary file, removed on the next open) or the new
one, never a manifest that points at a partial file. A checkpoint made with a different model,
calibration set or options is refused with a message saying which differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from sdsx.fingerprint import CHUNK_BYTES, fingerprint_calibration, fingerprint_model  # the latter two re-exported

log = logging.getLogger("sdsx")

__all__ = [
    "ACTIVATIONS_AUTO_BYTES",
    "Checkpoint",
    "CheckpointMismatch",
    "MANIFEST",
    "fingerprint_calibration",
    "fingerprint_model",
]

#: the manifest's name; a folder holding it is an unfinished sdsx run (see :func:`sdsx.io.check_out_dir`)
MANIFEST = "sdsx-checkpoint.json"
SUBDIR = "checkpoint"
FORMAT = "sdsx-checkpoint"
FORMAT_VERSION = 1
#: with ``save_activations=None`` the next block's inputs are stored when at most this large, else
#: recomputed on resume by re-running the finished blocks
ACTIVATIONS_AUTO_BYTES = 2 << 30


class CheckpointMismatch(ValueError):
    """The checkpoint in a folder was made by a different run (model, calibration or options)."""


# ------------------------------------------------------------------------------- fault injection
_fault_counts: dict[str, int] = {}


def fault_point(event: str) -> None:
    """Kill this process with SIGKILL at the n-th ``event`` when ``SDSX_KILL_AT=event:n`` is set.

    Only the tests use it, to interrupt runs at exact points (inside a checkpoint write, in the
    middle of a block) and check that the resumed run ends where an uninterrupted one does.
    """
    spec = os.environ.get("SDSX_KILL_AT")
    if not spec:
        return
    only = os.environ.get("SDSX_KILL_RANK")  # distributed tests: kill one rank only
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    name, _, count = spec.partition(":")
    if name != event:
        return
    _fault_counts[event] = _fault_counts.get(event, 0) + 1
    if _fault_counts[event] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------- hashing
def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        fault_point("write")  # a kill here leaves half a temporary file, which must not matter
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=dict(metadata) if metadata else None)
    _atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ checkpoint
class Checkpoint:
    """The checkpoint of one run in ``directory``; created or reopened with :meth:`open`.

    A run consists of named passes (``"prune"``; SDS's phased schedule has three). For each pass
    the manifest lists the finished blocks in order; the driver restores those and continues.

    Args:
        directory: the folder (created if missing).
        fingerprint: ``{"model": sha, "calibration": sha, "options": {...}}``; a manifest already
            in the folder must match it, else :class:`CheckpointMismatch`.
        save_activations: store the next block's inputs after every block (True), never
            (False: resuming re-runs the finished blocks on the calibration set), or when they
            take at most :data:`ACTIVATIONS_AUTO_BYTES` (None).
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: Mapping[str, Any], *, save_activations: bool | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.fingerprint = json.loads(json.dumps(dict(fingerprint), default=str))
        self.save_activations = save_activations
        self.manifest: dict[str, Any] = {}

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, directory: str | os.PathLike, fingerprint: Mapping[str, Any], *, save_activations: bool | None = None) -> "Checkpoint":
        """Open the checkpoint in ``directory``, or start one; refuses a foreign checkpoint."""
        ckpt = cls(directory, fingerprint, save_activations=save_activations)
        ckpt._load()
        return ckpt

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    @property
    def files(self) -> Path:
        return self.directory / SUBDIR

    def _load(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.files.mkdir(exist_ok=True)
        for tmp in list(self.files.glob("*.tmp")) + list(self.directory.glob(MANIFEST + ".tmp")):
            tmp.unlink()  # left by a kill during a write; the manifest never points at one
        if not self.manifest_path.is_file():
            self.manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                             "created": time.time(), "passes": {}, "notes": {}}
            self._write_manifest()
            return
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointMismatch(f"{self.manifest_path} is not a readable sdsx checkpoint ({exc}); remove the folder to start over") from exc
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointMismatch(
                f"{self.manifest_path} was written by another sdsx version (format {manifest.get('format_version')}); "
                "remove the folder to start over"
            )
        differs = _differences(manifest.get("fingerprint", {}), self.fingerprint)
        if differs:
            raise CheckpointMismatch(
                f"the checkpoint in {self.directory} belongs to another run: " + "; ".join(differs)
                + ". Re-run with the original settings to resume, or use another folder (or --overwrite) to start over"
            )
        self.manifest = manifest
        done = {p: len(v.get("blocks", [])) for p, v in manifest["passes"].items()}
        if done:
            log.info("resuming from checkpoint %s: finished blocks per pass %s", self.directory, done)

    def _write_manifest(self) -> None:
        self.manifest["updated"] = time.time()
        _atomic_write_bytes(self.manifest_path, (json.dumps(self.manifest, indent=1) + "\n").encode("utf-8"))

    # ---------------------------------------------------------------- queries
    def _pass(self, name: str) -> dict[str, Any]:
        return self.manifest["passes"].setdefault(name, {"blocks": [], "activations": None, "timings": {}})

    def finished(self, pass_name: str) -> int:
        """How many blocks of ``pass_name`` are finished (blocks 0 .. n-1)."""
        return len(self.manifest["passes"].get(pass_name, {}).get("blocks", []))

    def timings(self, pass_name: str) -> dict[str, float]:
        """The pass's accumulated driver timings when its last finished block was saved."""
        return dict(self.manifest["passes"].get(pass_name, {}).get("timings", {}))

    def note(self, key: str, value: Any = None) -> Any:
        """Store a JSON-able ``value`` under ``key`` (when given) and return what is stored."""
        notes = self.manifest.setdefault("notes", {})
        if value is not None:
            notes[key] = json.loads(json.dumps(value, default=str))
            self._write_manifest()
        return notes.get(key)

    def _read(self, entry: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.files / entry["file"]
        if not path.is_file():
            raise CheckpointMismatch(f"checkpoint file {path} is missing; remove {self.directory} to start over")
        sha = _file_sha(path)
        if sha != entry["sha256"]:
            raise CheckpointMismatch(f"checkpoint file {path} is corrupt (SHA-256 mismatch); remove {self.directory} to start over")
        return load_file(str(path))

    def load_block(self, pass_name: str, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Block ``index``'s saved tensors and its JSON record."""
        entry = self.manifest["passes"][pass_name]["blocks"][index]
        return self._read(entry), entry.get("record", {})

    def load_activations(self, pass_name: str) -> list[torch.Tensor] | None:
        """The inputs of the first unfinished block, when they were stored."""
        entry = self.manifest["passes"].get(pass_name, {}).get("activations")
        if not entry or entry.get("after") != self.finished(pass_name) - 1:
            return None
        tensors = self._read(entry)
        return [tensors[str(i)] for i in range(len(tensors))]

    # ---------------------------------------------------------------- writing
    def wants_activations(self, buffer: list[torch.Tensor]) -> bool:
        if self.save_activations is not None:
            return bool(self.save_activations)
        return sum(t.numel() * t.element_size() for t in buffer) <= ACTIVATIONS_AUTO_BYTES

    def save_block(
        self,
        pass_name: str,
        index: int,
        tensors: Mapping[str, torch.Tensor],
        record: Mapping[str, Any],
        timings: Mapping[str, float],
        activations: list[torch.Tensor] | None = None,
    ) -> None:
        """Record block ``index`` of ``pass_name`` as finished (blocks must finish in order)."""
        entry = self._pass(pass_name)
        if index != len(entry["blocks"]):
            raise RuntimeError(f"checkpoint: block {index} of pass {pass_name!r} saved out of order ({len(entry['blocks'])} finished)")
        name = f"{pass_name}-block-{index:05d}.safetensors"
        sha = atomic_save_tensors(self.files / name, tensors)
        old = entry.get("activations")
        if activations is not None:
            act_name = f"{pass_name}-act-{index:05d}.safetensors"
            act_sha = atomic_save_tensors(self.files / act_name, {str(i): t for i, t in enumerate(activations)})
            entry["activations"] = {"file": act_name, "sha256": act_sha, "after": index}
        else:
            entry["activations"] = None
        entry["blocks"].append({"file": name, "sha256": sha, "record": json.loads(json.dumps(dict(record), default=str))})
        entry["timings"] = dict(timings)
        self._write_manifest()
        # only now is the previous activations file unreferenced
        if old and (entry["activations"] is None or old["file"] != entry["activations"]["file"]):
            (self.files / old["file"]).unlink(missing_ok=True)

    def finish_pass(self, pass_name: str) -> None:
        """Drop the pass's stored activations (a finished pass needs none)."""
        entry = self._pass(pass_name)
        old = entry.get("activations")
        if old:
            entry["activations"] = None
            self._write_manifest()
            (self.files / old["file"]).unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the manifest first (so the folder stops being a checkpoint), then the files."""
        self.manifest_path.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        shutil.rmtree(self.files, ignore_errors=True)
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            inner = [f"{k}={a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out.append(f"{key} differ ({', '.join(inner)})")
        elif key in ("model", "calibration"):
            out.append(f"the {key} differs (fingerprint {str(a)[:12]} there, {str(b)[:12]} now)")
        else:
            out.append(f"{key} differs ({a!r} there, {b!r} now)")
    return out
