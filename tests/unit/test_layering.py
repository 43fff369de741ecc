"""The import-linter contracts in pyproject.toml hold, and they catch a broken rule."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "server", "agent", "gateway")


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": f"{tree}:{ROOT / 'generated'}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages and the contracts, free to break."""
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _add_import(module: Path, statement: str) -> None:
    text = module.read_text()
    module.write_text(
        text.replace(
            "from __future__ import annotations\n",
            f"from __future__ import annotations\n\n{statement}\n",
            1,
        )
    )


@pytest.mark.parametrize(
    ("module", "statement", "contract"),
    [
        ("server/cloud/pricing.py", "import grpc", "domain modules import no transport"),
        ("agent/session.py", "import server.cloud.pricing", "never import the control plane"),
        ("core/errors.py", "import gateway.sse", "core is neutral"),
        ("server/network/routing.py", "import asyncpg", "domain modules import no transport"),
        (
            "server/network/service.py",
            "import core.convert.job_events",
            "domain modules import no transport",
        ),
        ("core/convert/catalog.py", "import grpc", "conversion modules import generated stubs"),
    ],
)
def test_a_broken_import_fails_the_linter(
    tree: Path, module: str, statement: str, contract: str
) -> None:
    _add_import(tree / module, statement)

    result = _lint_imports(tree)

    assert result.returncode != 0
    assert f"{contract}" in result.stdout
    assert "BROKEN" in result.stdout


def test_the_tree_as_committed_keeps_every_contract(tree: Path) -> None:
    result = _lint_imports(tree)

    assert result.returncode == 0, result.stdout
    assert "0 broken" in result.stdout
