"""The package's layering (pyproject.toml, [tool.importlinter]) holds, and breaks loudly when broken.

The contracts: cli → runs → export → audio → model → base, no import cycle at
any depth, and no typer/click/rich below the CLI. Each is checked on the real
package, then on a copy with one violation planted, so a contract that could
not fail would fail here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tydust_gen"
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _lint(src_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src_root)}
    return subprocess.run(
        [sys.executable, "-c", LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )  # fmt: skip


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package with ``line`` appended to ``module`` (a path inside the package)."""
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "tydust_gen", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    target = src / "tydust_gen" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    return src


def test_the_package_keeps_every_contract(tmp_path):
    proc = _lint(ROOT / "src", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a lower layer reaching up: the model importing the export stage
        ("model/generate.py", "from tydust_gen.export import staging  # noqa", "Pipeline layers"),
        # a cycle inside one layer: windows ↔ generate
        ("model/windows.py", "from tydust_gen.model import generate  # noqa", "No import cycles"),
        # the core printing with rich
        ("runs/batch.py", "import rich  # noqa", "never imports the CLI libraries"),
    ],
)
def test_a_planted_violation_breaks_its_contract(tmp_path, module, line, broken):
    proc = _lint(_copy_with(tmp_path, module, line), tmp_path)
    assert proc.returncode != 0
    assert "1 broken" in proc.stdout, proc.stdout
    broken_line = next(ln for ln in proc.stdout.splitlines() if ln.endswith("BROKEN"))
    assert broken in broken_line
