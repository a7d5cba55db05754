"""The documentation says what the code does: docs/embedding.md's code runs as written, the
pages name every action, phase and error the runtimes and the error tree have, and what
`import svantic_adapters` loads is what its docstring and docs/adapters.md say."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from svantic_proto import agent_runtime, errors, mesh_runtime
from svantic_proto.agent_runtime import AgentPhase
from svantic_proto.mesh_runtime import MeshPhase

DOCS = Path(__file__).resolve().parents[1] / "docs"
EMBEDDING = (DOCS / "embedding.md").read_text(encoding="utf-8")
ERRORS = (DOCS / "errors.md").read_text(encoding="utf-8")


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page, re.S | re.M)


def test_the_embedding_example_runs() -> None:
    """Every python block, in page order, in one namespace: the in-memory agent and mesh
    connect, a dispatch comes back, the agent stops and the mesh shuts down (its asserts)."""
    blocks = _python_blocks(EMBEDDING)
    assert len(blocks) >= 4, "docs/embedding.md lost its example"
    source = "\n\n".join(blocks)
    namespace: dict[str, Any] = {"__name__": "embedding_example"}
    exec(compile(source, str(DOCS / "embedding.md"), "exec"), namespace)
    assert namespace["outcome"].value == {"x": 1}
    assert namespace["mesh"].phase is MeshPhase.CLOSED


@pytest.mark.parametrize("name", [
    "Dial", "AbortTransport", "StartHandler", "CancelHandler", "FetchToken", "Stopped",
])
def test_every_agent_action_is_described(name: str) -> None:
    assert name in agent_runtime.__all__
    assert f"`{name}(" in EMBEDDING


@pytest.mark.parametrize("name", [
    "ServiceLink", "DropLink", "AdmissionNeeded", "AgentArrived", "ShutdownComplete",
    "ServeHttp",
])
def test_every_mesh_action_is_described(name: str) -> None:
    assert name in mesh_runtime.__all__
    assert f"`{name}(" in EMBEDDING


def test_every_phase_is_in_the_tables() -> None:
    rows = [line for line in EMBEDDING.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([A-Z]+)`", row)}
    assert {phase.name for phase in AgentPhase} <= named
    assert {phase.name for phase in MeshPhase} <= named


def test_every_error_class_is_on_the_errors_page() -> None:
    missing = [name for name in errors.__all__ if f"{name} " not in ERRORS]
    assert not missing, f"docs/errors.md does not name {missing}"


def test_importing_the_adapters_package_loads_what_the_docs_say() -> None:
    """The package loads none of them; an adapter module loads `ssl`, `socket`, `threading`
    (hence the gevent patch-first advice) and its own event loop only."""
    probe = ("import json, sys, svantic_adapters; print(json.dumps(sorted(m for m in "
             "('asyncio', 'anyio', 'trio', 'gevent', 'ssl', 'socket', 'threading') "
             "if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=DOCS.parent, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
    probe = probe.replace("svantic_adapters;", "svantic_adapters.asyncio;")
    result = subprocess.run([sys.executable, "-c", probe], cwd=DOCS.parent, capture_output=True,
                            text=True, timeout=60, check=False)
    assert json.loads(result.stdout.splitlines()[-1]) == ["asyncio", "socket", "ssl", "threading"]
