"""A clone installs with a plain `pip install .`, no extras, and `svantic demo` tells its story.

As a new user would: a fresh virtualenv, `pip install <clone>` with pip's defaults (an
isolated build that fetches the build requirements, the dependencies from the package
index), then the `svantic` command from outside the source tree. Slow: about a minute, most of
it pip; bounded by the timeouts below. It needs the package index, as any install does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
# What a clone does not have: builds, caches, virtualenvs, compiled modules of the tree.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.pyd",
    ".hypothesis", ".mypy_cache", ".ruff_cache", ".pytest_cache", "_build",
)


def clean_env() -> dict[str, str]:
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "SVANTIC_PURE_PYTHON", "SVANTIC_COMPILE"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def venv_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("install")
    clone = base / "svantic-proto"
    shutil.copytree(ROOT, clone, ignore=NOT_IN_A_CLONE)
    venv = base / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], base, 120)
    assert made.returncode == 0, made.stderr
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    installed = run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(clone)],
                    base, 600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return bin_dir


def test_pip_install_then_svantic_demo_exits_0(venv_bin: Path) -> None:
    probe = "import svantic_proto; print(svantic_proto.__file__)"
    where = run([str(venv_bin / "python"), "-c", probe], venv_bin, 60)
    assert where.returncode == 0 and str(ROOT) not in where.stdout, where.stdout + where.stderr
    done = run([str(venv_bin / "svantic"), "demo"], venv_bin, 120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hold handler ran 1 time(s) across the cut; result delivered once: yes" in done.stdout
    assert "UNEXPECTED" not in done.stdout
    # The whole story from an installed package: the mesh, the SDK's agents, the hosted one.
    for step in ("hosted agent: token, serve, register", "tool call: connected ask -> hosted",
                 "fleet: POST /agents/get_connection_stats"):
        assert step in done.stdout, done.stdout


def test_an_adapter_without_its_extra_says_which_to_install(venv_bin: Path) -> None:
    done = run([str(venv_bin / "svantic"), "demo", "--adapter", "gevent"], venv_bin, 60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pip install 'svantic-proto[gevent]'" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
