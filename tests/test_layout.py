"""The package's shape: no private name crosses a module boundary inside sdsx (ruff's PLC2701 sees
only imports from other packages), and the ruff configuration CI runs holds."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sdsx"
# modules whose own name is private by design (the extension and its loader)
PRIVATE_MODULES = {"_C", "_ext"}


def _from_sdsx(tree: ast.AST, skip: set[int] = frozenset()) -> list[ast.ImportFrom]:
    """Every ``from sdsx... import ...`` in ``tree``, but the nodes whose id is in ``skip``."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and id(node) not in skip
            and node.module and node.module.split(".")[0] == "sdsx"]


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in _from_sdsx(ast.parse(path.read_text(), filename=str(path))):
        for alias in node.names:
            if alias.name.startswith("_") and alias.name not in PRIVATE_MODULES and not alias.name.startswith("__"):
                found.append(f"{path.name}:{node.lineno} imports {alias.name} from {node.module}")
    return found


def test_no_private_name_is_imported_across_modules():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _private_imports(path)]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_scan_sees_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from sdsx.checkpoint import _secret\nfrom sdsx import _ext\n")
    hits = _private_imports(bad)
    assert len(hits) == 1 and "_secret" in hits[0]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (CI installs it and runs it)")
def test_ruff_passes():
    out = subprocess.run(["ruff", "check", "sdsx", "bench", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# Layers, lowest first: a module imports only from its own layer or below (longest prefix decides).
LAYERS = [
    ("sdsx.numerics", "sdsx.fingerprint", "sdsx.defaults", "sdsx.flags", "sdsx.data.paths"),
    ("sdsx._ext", "sdsx._C", "sdsx.ops", "sdsx.stats"),
    ("sdsx.pruners",),  # the pure tensor functions
    ("sdsx.data", "sdsx.checkpoint"),
    ("sdsx.model",),  # blocks, attention kinds, the offline models
    ("sdsx.engine",),  # the driver's parts
    ("sdsx.model.driver", "sdsx.eval"),
    ("sdsx.io", "sdsx.guard", "sdsx.report", "sdsx.parallel"),
    ("sdsx.api", "sdsx.sds", "sdsx.config", "sdsx.job", "sdsx.commands", "sdsx.cli", "sdsx.__main__", "sdsx"),  # entry points
]


def _rank(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank)
    return None if best is None else best[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every sdsx module ``path`` imports (``from sdsx import ops`` is sdsx.ops),
    but for type annotations only (``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
                   for stmt in node.body for n in ast.walk(stmt)}
    out = []
    for node in _from_sdsx(tree, typing_only):
        folder = PACKAGE.joinpath(*node.module.split(".")[1:])
        out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                if (folder / a.name).with_suffix(".py").is_file() or (folder / a.name).is_dir()]
        out.append((node.lineno, node.module))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and id(node) not in typing_only:
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "sdsx"]
    return out


def _upward(path: Path, module: str | None = None) -> list[str]:
    if module is None:
        module = ".".join(p for p in path.relative_to(ROOT).with_suffix("").parts if p != "__init__")
    mine = _rank(module)
    assert mine is not None, f"{module} is in no layer of tests/test_layout.py::LAYERS: place it"
    found = []
    for line, target in _imports(path):
        theirs = _rank(target)
        if target != "sdsx" and theirs is not None and theirs > mine:
            found.append(f"{module}:{line} imports {target} (layer {theirs} above its {mine})")
    return found


def test_modules_import_only_from_their_layer_or_below():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _upward(path)]
    assert not found, "imports from a higher layer:\n" + "\n".join(found)


def test_the_layer_scan_sees_an_upward_import(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("from sdsx.sds import sds_prune\nfrom sdsx import ops\n")
    hits = _upward(bad, "sdsx.pruners.probe")
    assert len(hits) == 1 and "sdsx.sds" in hits[0]
