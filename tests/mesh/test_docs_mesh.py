"""docs/mesh.md says what the mesh does: its flags are `svantic mesh`'s, its paths are the
control plane's, and the files it names are the ones a first run makes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from svantic_mesh import cli, control
from svantic_mesh.serve import MeshHome

PAGE = (Path(__file__).resolve().parents[2] / "docs" / "mesh.md").read_text(encoding="utf-8")


def test_every_flag_on_the_page_is_a_flag_of_svantic_mesh(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["mesh", "--help"])
    flags = set(re.findall(r"(--[a-z-]+)", capsys.readouterr().out))
    table = PAGE.split("Flags:", 1)[1].split("\n\n", 2)[1]
    named = set(re.findall(r"`(--[a-z-]+)", table))
    assert named and named <= flags
    assert flags - {"-h", "--help"} <= named, "a flag of svantic mesh is missing on the page"


def test_every_path_on_the_page_is_served() -> None:
    rows = [line for line in PAGE.split("## The control plane", 1)[1].splitlines()
            if line.startswith("| `")]
    named = {path for row in rows for path in re.findall(r"`(?:GET )?(/[a-z_./-]+)`", row)}
    assert named == set(control._ROUTES)


def test_the_files_beside_the_database_are_the_ones_named(tmp_path: Path) -> None:
    home = MeshHome.for_db(str(tmp_path / "svantic-mesh.db"))
    home.secrets(environ={})
    home.certificate()
    made = sorted(path.name for path in tmp_path.iterdir())
    assert made == sorted(["svantic-mesh.secrets.json", "svantic-mesh.ca.pem",
                           "svantic-mesh.cert.pem", "svantic-mesh.key.pem"])
    for name in made:
        assert f"`{name}`" in PAGE
    for name in ("secrets.json", "key.pem"):
        assert (tmp_path / f"svantic-mesh.{name}").stat().st_mode & 0o077 == 0
