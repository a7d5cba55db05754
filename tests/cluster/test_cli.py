"""`svantic mesh --redis`: what it refuses, and what the one-process default keeps out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from svantic_mesh import cli


@pytest.mark.parametrize("adapter", ["trio"])
def test_adapters_without_a_cluster_client_refuse_redis(
        adapter: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli._parser().parse_args(["mesh", "--adapter", adapter, "--redis",
                                     "redis://127.0.0.1:1/0", "--db", str(tmp_path / "m.db")])
    assert cli.mesh(args) == 2
    assert "--redis needs the asyncio, anyio (on asyncio) or gevent adapter" in (
        capsys.readouterr().err)
    assert not (tmp_path / "m.db").exists()  # refused before anything was made


def test_the_one_process_mesh_never_imports_redis() -> None:
    code = ("import sys, svantic_mesh.cli, svantic_mesh.serve, svantic_mesh.app, "
            "svantic_mesh.fleet; assert 'redis' not in sys.modules, 'redis imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
