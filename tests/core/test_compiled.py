"""The compiled build and the sources are one implementation: a switch picks the sources.

The rest of the suite runs on whatever is installed (compiled when a compiler was there);
`scripts/test` runs the core suite a second time with `SVANTIC_PURE_PYTHON=1`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

import svantic_proto
from svantic_proto import DispatchReceived, _compiled
from svantic_proto.framing import Framing, TextReceived
from svantic_proto.testing import Pair

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
