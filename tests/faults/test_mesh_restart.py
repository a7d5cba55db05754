"""The mesh process dies and comes back on the same port with its SQLite registry on disk
(issue 17; spec 5).

What a caller sees (decided): a dispatch in flight when the mesh process is killed ends with
the caller's own connection error at once (the process that would answer is gone: nobody can
send `AGENT_DISCONNECTED`); one in flight when the mesh is stopped (SIGTERM) past its grace
ends `AGENT_DISCONNECTED` from the mesh, as soon as the grace ends. Neither hangs. The
agents back off, dial again, and are served by the new process without anyone registering
them (the registry kept them); dispatches after that succeed, and no handler runs twice.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
from faults_harness import AgentsProcess, MeshProcess, Outcome, call, start_agents, start_mesh

AGENTS = 3
AGENT_CONFIG = {"reconnect_base_delay": 0.2, "reconnect_max_delay": 1.0}


async def _calls(mesh: MeshProcess, token: str, keys: range, **options: object) -> list[Outcome]:
    async with httpx.AsyncClient(base_url=mesh.url, verify=mesh.context(), trust_env=False,
                                 timeout=30) as http:
        return list(await asyncio.gather(*(call(http, token, key, **options)  # type: ignore[arg-type]
                                           for key in keys)))


def _running(agents: AgentsProcess, count: int) -> None:
    agents.lines.wait(lambda lines: sum(1 for line in lines if line.startswith("run ")) >= count,
                      20, f"{count} handlers running")


def _all_back(agents: AgentsProcess, prefix: str, after: float) -> float:
    return max(agents.lines.when(f"up {prefix}-{n} fresh", 30, after) for n in range(AGENTS))


@pytest.mark.parametrize("adapter", ["asyncio", "gevent"])
def test_killed_mesh_comes_back_and_agents_with_it(tmp_path: Path, adapter: str) -> None:
    mesh = start_mesh(tmp_path, adapter=adapter)
    prefix = f"rs-{adapter}"
    agents = start_agents(mesh, prefix=prefix, count=AGENTS, adapter=adapter,
                          config=AGENT_CONFIG)
    try:
        token = mesh.token()

        async def kill_in_flight() -> tuple[list[Outcome], float]:
            calls = asyncio.ensure_future(_calls(mesh, token, range(AGENTS), sleep=30,
                                                 deadline_ms=60_000, tell=True))
            await asyncio.to_thread(_running, agents, AGENTS)
            killed = time.monotonic()
            mesh.kill()
            outcomes = await asyncio.wait_for(calls, 10)
            return outcomes, time.monotonic() - killed

        in_flight, ended_after = asyncio.run(kill_in_flight())
        restarted = time.monotonic()
        mesh = start_mesh(tmp_path, adapter=adapter, port=mesh.port)
        back = _all_back(agents, prefix, restarted) - restarted
        after = asyncio.run(_calls(mesh, mesh.token(), range(100, 130)))
        runs = agents.finish()
    finally:
        agents.kill()
        mesh.stop()
    print(f"\n{adapter}: in-flight callers ended {ended_after:.2f} s after the kill with "
          f"{[o.code for o in in_flight]}; all {AGENTS} agents back {back:.2f} s after the "
          "restart began")
    assert all(outcome.status is None for outcome in in_flight)  # the connection broke
    assert ended_after < 2
    assert [outcome.body["result"]["v"] for outcome in after] == [
        3 * key + 1 for key in range(100, 130)]
    assert max(runs.values()) == 1
    assert "Traceback" not in mesh.log()


@pytest.mark.parametrize("adapter", ["asyncio", "gevent"])
def test_stopped_mesh_fails_what_outlasts_its_grace(tmp_path: Path, adapter: str) -> None:
    mesh = start_mesh(tmp_path, adapter=adapter)
    agents = start_agents(mesh, prefix="grace", count=1, adapter=adapter, config=AGENT_CONFIG)
    try:
        token = mesh.token()

        async def stop_in_flight() -> tuple[list[Outcome], float]:
            calls = asyncio.ensure_future(_calls(mesh, token, range(1), sleep=30,
                                                 deadline_ms=60_000, tell=True))
            await asyncio.to_thread(_running, agents, 1)
            stopped = time.monotonic()
            mesh.proc.send_signal(signal.SIGTERM)  # drains with a grace of 1 s
            outcomes = await asyncio.wait_for(calls, 15)
            return outcomes, time.monotonic() - stopped

        in_flight, ended_after = asyncio.run(stop_in_flight())
        mesh.proc.wait(15)
        restarted = time.monotonic()
        mesh = start_mesh(tmp_path, adapter=adapter, port=mesh.port)
        agents.lines.when("up grace-0 fresh", 30, restarted)
        after = asyncio.run(_calls(mesh, mesh.token(), range(5)))
        runs = agents.finish()
    finally:
        agents.kill()
        mesh.stop()
    print(f"\n{adapter}: SIGTERM: in-flight caller got "
          f"{[(o.status, o.code) for o in in_flight]} after {ended_after:.2f} s")
    # Spec 5: AGENT_DISCONNECTED from the mesh. A mesh shutting down resumes nothing, so the
    # dispatch fails when the 1001 at the grace's end closes the agent's session, while the
    # caller's connection is still up: well before grace (1 s) + close_timeout (5 s).
    assert [(o.status, o.code) for o in in_flight] == [(502, "AGENT_DISCONNECTED")]
    assert ended_after < 1 + 1.5
    assert all(outcome.status == 200 for outcome in after)
    assert max(runs.values()) == 1


@pytest.mark.parametrize("adapter", ["asyncio", "gevent", "anyio"])
def test_agents_register_again_when_the_mesh_forgot_them(tmp_path: Path, adapter: str) -> None:
    """The mesh comes back without its registry (the database was lost, the secrets and the
    certificate kept): the handshake is refused 404 `INSTANCE_NOT_FOUND`, which the transport
    does not retry (spec 5). The SDK's connector registers the instance again by itself and
    dials the new `connect_url`: the agent is served again with nobody's help."""
    mesh = start_mesh(tmp_path, adapter=adapter)
    prefix = f"fg-{adapter}"
    agents = start_agents(mesh, prefix=prefix, count=2, adapter=adapter, config=AGENT_CONFIG)
    try:
        mesh.kill()
        (tmp_path / "m.db").unlink()
        restarted = time.monotonic()
        mesh = start_mesh(tmp_path, adapter=adapter, port=mesh.port)
        back = max(agents.lines.when(f"up {prefix}-{n} fresh", 30, restarted)
                   for n in range(2)) - restarted
        after = asyncio.run(_calls(mesh, mesh.token(), range(10)))
        agents.finish()
    finally:
        agents.kill()
        mesh.stop()
    print(f"\n{adapter}: registry lost; both agents registered and connected again after "
          f"{back:.2f} s")
    assert [outcome.body["result"]["v"] for outcome in after] == [3 * k + 1 for k in range(10)]
