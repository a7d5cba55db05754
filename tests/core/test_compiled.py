"""One implementation, compiled or not; and a development build that cannot go stale.

The development install (`./scripts/_env`, an editable install) is pure Python: after editing
a core source, a plain `pytest` runs the edited code. The compiled core is opt-in
(`SVANTIC_COMPILE=1` at build time, see `setup.py`) and is never built beside the sources;
`scripts/test` builds it into a wheel, installs that into a venv of its own, and runs the
core's tests against it from outside the tree with `SVANTIC_EXPECT_COMPILED=1`.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import svantic_proto
from svantic_proto import DispatchReceived, _compiled
from svantic_proto.framing import Framing, TextReceived
from svantic_proto.testing import Pair

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "svantic_proto"
EXPECT_COMPILED = os.environ.get("SVANTIC_EXPECT_COMPILED", "") == "1"
DEVELOPMENT_INSTALL = Path(svantic_proto.__file__).resolve().parent == SOURCES
# What a mypyc build makes in the package: one module per compiled source and their library.
MYPYC_OUTPUTS = (*_compiled.COMPILED_MODULES, "_native__mypyc")

PROBE = (
    "import json, importlib, svantic_proto as s; from svantic_proto import _compiled as c; "
    "print(json.dumps([s.COMPILED, [importlib.import_module('svantic_proto.' + m).__file__ "
    "for m in c.COMPILED_MODULES]]))"
)


def probe(switch: str | None) -> tuple[bool, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != _compiled.PURE_PYTHON_ENV}
    if switch is not None:
        env[_compiled.PURE_PYTHON_ENV] = switch
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env,
        capture_output=True, text=True, timeout=60, check=True,
    )
    compiled, files = json.loads(done.stdout)
    return compiled, files


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", readme, re.S | re.M)
    assert match, f"README.md has no section {title!r}"
    return match.group(1)


@pytest.mark.skipif(not DEVELOPMENT_INSTALL, reason="runs on the development install")
def test_the_development_install_runs_the_sources() -> None:
    """No switch set: what a plain `pytest` imports is the sources, as the README says."""
    assert "`svantic_proto.COMPILED` is `False`" in readme_section("The compiled core")
    left = [path.name for name in MYPYC_OUTPUTS
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (path := SOURCES / f"{name}{suffix}").exists()]
    assert not left, (
        f"compiled modules beside their sources would run instead of them: {left}; an "
        "editable install removes them (./scripts/test, or pip install -e .)")
    compiled, files = probe(None)
    assert compiled is False
    assert all(Path(f).resolve().parent == SOURCES and f.endswith(".py") for f in files)


@pytest.mark.skipif(not DEVELOPMENT_INSTALL, reason="runs on the development install")
def test_the_c_extension_is_not_older_than_its_source() -> None:
    """`_speedups` has no `.py` twin, so the editable install builds it beside its source."""
    try:
        from svantic_proto import _speedups
    except ImportError:
        pytest.skip("built without a C compiler: the codec runs its pure-Python fallback")
    built = Path(_speedups.__file__)
    source = SOURCES / "_speedups.c"
    assert built.stat().st_mtime >= source.stat().st_mtime, (
        f"{built.name} is older than {source.name}: rebuild it with ./scripts/test "
        "(or pip install -e .) before running the tests")


@pytest.mark.skipif(not EXPECT_COMPILED, reason="runs in the compiled run of scripts/test")
def test_the_compiled_run_runs_the_installed_compiled_build() -> None:
    assert os.environ.get(_compiled.PURE_PYTHON_ENV, "") in ("", "0")
    assert not DEVELOPMENT_INSTALL, f"{svantic_proto.__file__} is the source tree"
    assert svantic_proto.COMPILED is True
    compiled, files = probe(None)
    assert compiled is True
    assert not any(f.endswith(".py") for f in files)


def test_scripts_test_has_the_compiled_run() -> None:
    script = (ROOT / "scripts" / "test").read_text()
    for step in ("SVANTIC_COMPILE=1", "pip wheel", "SVANTIC_EXPECT_COMPILED=1",
                 '"$root/tests/core"', '"$root/tests/test_bench_roundtrip_smoke.py"'):
        assert step in script, f"scripts/test lost a step of its compiled run: {step}"
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_the_switch_imports_every_compiled_module_from_its_source() -> None:
    compiled, files = probe("1")
    assert compiled is False
    assert all(f.endswith(".py") for f in files)


def test_zero_or_empty_means_whatever_is_installed() -> None:
    installed = probe(None)
    assert probe("0") == installed
    assert probe("") == installed


def test_a_build_is_all_compiled_or_all_sources() -> None:
    """One shared library holds the compiled modules: a partial build must never load."""
    states = {
        _compiled.is_compiled(importlib.import_module(f"svantic_proto.{name}"))
        for name in _compiled.COMPILED_MODULES
    }
    assert states == {svantic_proto.COMPILED}


def test_the_compiled_modules_are_the_per_frame_path() -> None:
    names = set(_compiled.COMPILED_MODULES)
    assert {"framing", "connection", "agent", "mesh"} <= names
    # Frames and events are msgspec Structs, which mypyc cannot compile: they stay sources.
    assert not names & {"frames", "events", "codec"}


@pytest.mark.parametrize("buffer", [bytes, bytearray, memoryview])
def test_read_bytes_may_come_as_any_buffer(buffer: Callable[[bytes], Any]) -> None:
    """A transport built on `recv_into` hands over views: both builds take them alike."""
    pair = Pair()
    pair.connect()
    pair.mesh.send_dispatch("echo", {"n": 1}, deadline_ms=1000, now=pair.clock.now)
    data = b"".join(pair.mesh.data_to_send())
    pair.agent.receive_data(buffer(data), pair.clock.now)
    (received,) = pair.agent.events_received()
    assert isinstance(received, DispatchReceived) and received.arguments == {"n": 1}
    framing = Framing(client=True)
    (text,) = framing.receive_data(buffer(data))
    assert isinstance(text, TextReceived) and '"dispatch"' in text.text
