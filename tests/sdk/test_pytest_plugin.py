"""The pytest plugin, used the way an agent author uses it: a test file of theirs, run by
pytest in a process of its own, with the plugin loaded from its entry point.

One file per way of writing tests: asyncio and trio (anyio's pytest plugin, one test run on
both backends), gevent (monkey-patched in the author's conftest, as gevent wants), and plain
blocking tests. Each connects the author's agent to `svantic_mesh` and calls it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

AGENT = '''\
import svantic

agent = svantic.Agent(agent_type="tickets", description="Ticket system")


@agent.capability(parameters={
    "type": "object",
    "properties": {"ticket_id": {"type": "string"}},
    "required": ["ticket_id"],
})
{ASYNC}def get_ticket(args, ctx):
    """Fetch a ticket."""
    return {"id": args["ticket_id"], "status": "open"}


@agent.capability()
{ASYNC}def history(args, ctx):
    """Stream the ticket's events."""
    for n in range(3):
        ctx.chunk({"event": n})
    return {"events": 3}


@agent.capability()
{ASYNC}def broken(args, ctx):
    raise RuntimeError("the ticket store is down")
'''

ASYNC_TESTS = '''\
import pytest
import svantic

from tickets import agent


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.mark.anyio
async def test_get_ticket(svantic_mesh):
    async with svantic_mesh.connect(agent):
        result = await svantic_mesh.call("get_ticket", {"ticket_id": "T-1"})
    assert result == {"id": "T-1", "status": "open"}


@pytest.mark.anyio
async def test_history_streams(svantic_mesh, agent_client):
    chunks = []
    async with svantic_mesh.connect(agent, instance_id="tickets-history"):
        result = await agent_client.call("history", {}, agent_type="tickets",
                                         on_chunk=chunks.append)
    assert chunks == [{"event": 0}, {"event": 1}, {"event": 2}]
    assert result == {"events": 3}


@pytest.mark.anyio
async def test_errors_are_the_sdks(svantic_mesh):
    async with svantic_mesh.connect(agent):
        with pytest.raises(svantic.SvanticApiError) as bad:
            await svantic_mesh.call("get_ticket", {"ticket_id": 1})
        with pytest.raises(svantic.SvanticApiError) as broken:
            await svantic_mesh.call("broken")
    assert bad.value.code == "INVALID_ARGUMENTS"
    assert broken.value.code == "DISPATCH_FAILED"
    with pytest.raises(svantic.AgentUnavailableError):  # disconnected: deregistered
        await svantic_mesh.call("get_ticket", {"ticket_id": "T-1"})


@pytest.mark.anyio
async def test_hosted(svantic_mesh):
    certfile, keyfile = svantic_mesh.issue_cert()
    async with svantic_mesh.connect(agent, deployment_mode="hosted", listen=("127.0.0.1", 0),
                                    certfile=certfile, keyfile=keyfile) as connector:
        assert connector.deployment_mode == "hosted"
        result = await svantic_mesh.call("get_ticket", {"ticket_id": "T-2"})
    assert result == {"id": "T-2", "status": "open"}
'''

GEVENT_CONFTEST = '''\
from gevent import monkey

monkey.patch_all()
'''

BLOCKING_TESTS = '''\
import pytest
import svantic
from svantic.pytest_plugin import start_mesh

from tickets import agent


def test_get_ticket(svantic_mesh):
    with svantic_mesh.connect_sync(agent):
        result = svantic_mesh.call_sync("get_ticket", {"ticket_id": "T-1"})
    assert result == {"id": "T-1", "status": "open"}


def test_history_streams(svantic_mesh, agent_client):
    chunks = []
    with svantic_mesh.connect_sync(agent):
        result = agent_client.call_sync("history", on_chunk=chunks.append)
    assert (chunks, result) == ([{"event": 0}, {"event": 1}, {"event": 2}], {"events": 3})


def test_a_failing_handler(svantic_mesh):
    with svantic_mesh.connect_sync(agent):
        with pytest.raises(svantic.SvanticApiError) as broken:
            svantic_mesh.call_sync("broken")
    assert broken.value.code == "DISPATCH_FAILED"


def test_a_mesh_of_my_own_without_dispatch_auth(tmp_path):
    mesh = start_mesh(tmp_path, dispatch_auth_enabled=False)
    try:
        with mesh.connect_sync(agent):
            assert mesh.call_sync("get_ticket", {"ticket_id": "T-3"})["id"] == "T-3"
    finally:
        mesh.stop()
{EXTRA}'''

GEVENT_EXTRA = '''

def test_the_process_is_monkey_patched(svantic_mesh):
    from gevent import monkey

    assert monkey.is_module_patched("socket")
'''


def _plugin_installed() -> bool:
    return any(entry.value == "svantic.pytest_plugin"
               for entry in metadata.entry_points(group="pytest11"))


def run_author_tests(folder: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """pytest on `folder`, in a process of its own, as the author would run it."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options,
               "--rootdir", str(folder), str(folder)]
    if not _plugin_installed():  # a checkout not yet re-installed: load it by name
        command[3:3] = ["-p", "svantic.pytest_plugin"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("SVANTIC_")}
    env.update(SVANTIC_PURE_PYTHON="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=240,
                          env=env, check=False)


def _passed(done: subprocess.CompletedProcess[str]) -> int:
    """How many tests passed; none may have failed or errored."""
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    match = re.search(r"(\d+) passed", summary)
    assert match and not re.search(r"failed|error", summary), done.stdout
    return int(match.group(1))


def test_asyncio_and_trio_tests(tmp_path: Path) -> None:
    (tmp_path / "tickets.py").write_text(AGENT.replace("{ASYNC}", "async "))
    (tmp_path / "test_tickets.py").write_text(ASYNC_TESTS)
    assert _passed(run_author_tests(tmp_path)) == 8  # four tests, each on asyncio and trio


@pytest.mark.parametrize("handlers", ["plain", "async"])
def test_blocking_tests(tmp_path: Path, handlers: str) -> None:
    (tmp_path / "tickets.py").write_text(AGENT.replace(
        "{ASYNC}", "async " if handlers == "async" else ""))
    (tmp_path / "test_tickets.py").write_text(BLOCKING_TESTS.replace("{EXTRA}", ""))
    assert _passed(run_author_tests(tmp_path)) == 4


def test_gevent_tests(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(GEVENT_CONFTEST)
    (tmp_path / "tickets.py").write_text(AGENT.replace("{ASYNC}", ""))
    (tmp_path / "test_tickets.py").write_text(BLOCKING_TESTS.replace("{EXTRA}", GEVENT_EXTRA))
    assert _passed(run_author_tests(tmp_path)) == 5
    # Loading this plugin imports neither ssl nor socket, so the conftest patches in time
    # (anyio's own plugin, loaded before any conftest too, does import ssl: set it aside).
    done = run_author_tests(tmp_path, "-p", "no:anyio")
    assert _passed(done) == 5
    assert "MonkeyPatchWarning" not in done.stdout + done.stderr, done.stdout


def test_the_plugin_is_an_entry_point() -> None:
    if not _plugin_installed():
        pytest.skip("the package is not installed with its entry points (pip install -e .)")
    entry = next(entry for entry in metadata.entry_points(group="pytest11")
                 if entry.value == "svantic.pytest_plugin")
    assert entry.name == "svantic"
