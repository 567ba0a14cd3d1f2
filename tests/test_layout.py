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


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sdsx":
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
