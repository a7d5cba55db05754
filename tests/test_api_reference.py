"""The API reference builds, as `scripts/docs` builds it: Sphinx autodoc over the pure-Python
sources, with every warning an error and every annotation's link checked (docs/api/conf.py),
and it describes every public name and includes every guide in docs/."""

from __future__ import annotations

import html
import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "api"
BUILD_TIMEOUT = 100  # seconds: it takes about 5 on a 2-core machine

# The public surface: each module has a page of the reference, named after it.
PUBLIC_MODULES = (
    "svantic_proto",
    "svantic_proto.errors",
    "svantic_proto.agent_runtime",
    "svantic_proto.mesh_runtime",
    "svantic_proto.capabilities",
    "svantic_proto.testing",
    "svantic_proto.frames",
    "svantic_proto.codec",
    "svantic_proto.ids",
    "svantic_proto.trace",
    "svantic_proto.backoff",
    "svantic_proto.messages",
    "svantic_adapters",
    "svantic_adapters.asyncio",
    "svantic_adapters.anyio",
    "svantic_adapters.gevent",
    "svantic_adapters.asgi",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("api-reference")
    env = {**os.environ, "SVANTIC_PURE_PYTHON": "1"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html",
         str(SOURCE), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, (
        f"the API reference does not build (scripts/docs) after {elapsed:.0f} s:\n"
        f"{result.stderr}{result.stdout}\n"
        "A type in a public signature that the reference cannot link: see nitpick_ignore in "
        "docs/api/conf.py. A docstring that is not valid reStructuredText: fix the docstring."
    )
    return out


def _anchors(built: Path) -> set[str]:
    return {
        html.unescape(anchor)
        for page in built.glob("*.html")
        for anchor in re.findall(r'\bid="([^"]+)"', page.read_text(encoding="utf-8"))
    }


def test_the_reference_builds_without_a_warning(built: Path) -> None:
    assert (built / "index.html").is_file()


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_is_described(built: Path, module_name: str) -> None:
    """Each name in the module's `__all__` is described on its page, or, when the module
    re-exports it from another public module, on that module's page (each object once)."""
    assert (built / f"{module_name}.html").is_file(), f"docs/api/{module_name}.rst is missing"
    anchors = _anchors(built)
    modules = {name: importlib.import_module(name) for name in PUBLIC_MODULES}
    module = modules[module_name]
    missing = []
    for name in module.__all__:
        value = getattr(module, name)
        if f"{module_name}.{name}" in anchors:
            continue
        if not any(
            f"{other}.{name}" in anchors and getattr(modules[other], name, None) is value
            for other in PUBLIC_MODULES
        ):
            missing.append(name)
    assert not missing, f"the reference does not describe {module_name}.{missing}"


def test_every_guide_is_in_the_reference(built: Path) -> None:
    """Each docs/*.md page is included (docs/api/<page>.md) and its title is on the page."""
    for guide in sorted((ROOT / "docs").glob("*.md")):
        assert (SOURCE / guide.name).is_file(), f"docs/api/{guide.name} does not include it"
        title = next(line for line in guide.read_text(encoding="utf-8").splitlines()
                     if line.startswith("# "))[2:]
        title_text = re.sub(r"`([^`]*)`", r"\1", title)
        page = html.unescape(re.sub(r"<[^>]+>", "", (built / f"{guide.stem}.html").read_text(
            encoding="utf-8"))).replace("\u2019", "'")
        assert title_text in page, f"{guide.name}: its title is not in the reference"


def test_the_readme_names_the_command() -> None:
    assert "./scripts/docs" in (ROOT / "README.md").read_text(encoding="utf-8")
