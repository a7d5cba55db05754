"""Fixtures of the hostile-input tests: a mesh process per module and adapter (asyncio, trio,
gevent), with a canary agent connected, on 127.0.0.1 with TLS; `make_mesh` for a test that
needs other bounds."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hostile_kit import MeshProcess, start_mesh, stop_mesh

HELLO_TIMEOUT = 2.0
"""The mesh's `hello_timeout` here (also its HTTP request timeout): a slowloris is cut after
it. Short, so the tests that wait for it stay short."""
OPTIONS: dict[str, Any] = {"config": {"hello_timeout": HELLO_TIMEOUT}}


def _checked_stop(mesh: MeshProcess) -> None:
    log = stop_mesh(mesh)
    assert "Traceback" not in log, log[-4000:]
    leaks = [line for line in log.splitlines() if "ERROR" in line or "CRITICAL" in line]
    assert not leaks, "\n".join(leaks[:20])


MESH_ADAPTERS = [name for name in ("asyncio", "trio", "gevent")
                 if os.environ.get("SVANTIC_HOSTILE_ADAPTER", name) == name]
"""The adapters the module meshes run on: all three, or the one `SVANTIC_HOSTILE_ADAPTER`
names (a quicker run while working on one)."""


@pytest.fixture(scope="module", params=MESH_ADAPTERS)
def mesh(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    """A mesh process on each adapter, with the canary agent `canary-1` connected."""
    adapter = str(request.param)
    running = start_mesh(tmp_path_factory.mktemp(f"hostile-mesh-{adapter}"), adapter, OPTIONS)
    try:
        running.register("canary-1")
        running.start_agent("canary-1")
        yield running
    finally:
        _checked_stop(running)


@pytest.fixture
def make_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., MeshProcess]]:
    """`make_mesh(adapter, **options)`: another mesh process for one test, stopped after it."""
    made: list[MeshProcess] = []

    def make(adapter: str = "asyncio", **options: Any) -> MeshProcess:
        merged = {**OPTIONS, **options}
        merged["config"] = {**OPTIONS["config"], **options.get("config", {})}
        running = start_mesh(tmp_path_factory.mktemp(f"hostile-{adapter}"), adapter, merged)
        made.append(running)
        return running

    try:
        yield make
    finally:
        for running in made:
            _checked_stop(running)

