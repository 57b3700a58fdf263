"""The offline install path of docs/service.md, prepared once per test session: a copy of the checkout
and a wheelhouse of the project and its dependencies, built by the Python that `make install` uses.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The Makefile's default PYTHON: wheels built by it install into the service's venv.
SYSTEM_PYTHON = Path("/usr/bin/python3")
_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", "build", "dist",
                                 ".mypy_cache", ".pytest_cache")
_prepared: dict[Path, tuple[Path, Path]] = {}


def copy_checkout(dest: Path) -> Path:
    """A copy of the working tree, so that builds (pip writes build/ in-tree) never touch the real one."""
    shutil.copytree(REPO, dest, ignore=_IGNORE, symlinks=True)
    return dest


def prepared(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkout copy, wheelhouse), made on first use in this pytest session.

    As docs/service.md says: a venv of the system Python, then
    `pip wheel --use-pep517 --wheel-dir wheelhouse . 'setuptools>=77'` (setuptools so that pip can build
    the project itself with no index).
    """
    base = factory.getbasetemp()
    if base not in _prepared:
        root = factory.mktemp("offline")
        src = copy_checkout(root / "web-ipt-d")
        builder, wheels = root / "builder", root / "wheelhouse"
        subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(builder)], check=True)
        proc = subprocess.run([str(builder / "bin" / "python"), "-m", "pip", "wheel", "--disable-pip-version-check",
                               "--use-pep517", "-q", "--wheel-dir", str(wheels), str(src), "setuptools>=77"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the wheelhouse failed:\n{proc.stdout}\n{proc.stderr}")
        shutil.rmtree(builder)
        for leftover in (src / "build", *src.glob("src/*.egg-info")):
            shutil.rmtree(leftover, ignore_errors=True)
        _prepared[base] = (src, wheels)
    return _prepared[base]
