"""The SDK's connector registers again when the mesh forgot its instance, and still
disconnects cleanly afterwards (in this process: asyncio, and anyio, whose transports belong
to the task that entered them). The gevent connector is covered by test_mesh_restart.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import svantic
from faults_harness import CLIENT, SIGNING, start_mesh

from svantic_proto import Config
from svantic_proto.events import SessionStarted


@pytest.mark.parametrize("adapter", ["asyncio", "anyio"])
def test_connector_registers_again_and_disconnects(tmp_path: Path, adapter: str) -> None:
    mesh = start_mesh(tmp_path)
    instance = f"sdk-rejoin-{adapter}"

    async def scenario() -> tuple[int, float, float]:
        nonlocal mesh
        agent = svantic.Agent("rejoin")

        @agent.capability("work")
        async def work(args: Any, ctx: Any) -> Any:
            return {"v": 3 * int(args["k"]) + 1}

        welcomes: list[anyio.Event] = [anyio.Event(), anyio.Event()]

        def on_event(event: Any) -> None:
            if isinstance(event, SessionStarted):
                next(e for e in welcomes if not e.is_set()).set()

        connector = svantic.MeshConnector(
            agent, svantic_url=mesh.url, client_id=CLIENT[0], client_secret=CLIENT[1],
            instance_id=instance, cafile=mesh.ca, adapter=adapter, signing_secret=SIGNING,
            config=Config(reconnect_base_delay=0.1, reconnect_max_delay=0.5))
        connector.on_event = on_event
        await connector.connect()
        mesh.kill()
        (tmp_path / "m.db").unlink()  # the registry is lost; secrets and certificate kept
        restarted = time.monotonic()
        mesh = await anyio.to_thread.run_sync(
            lambda: start_mesh(tmp_path, port=mesh.port))
        with anyio.fail_after(20):
            await welcomes[1].wait()
        back = time.monotonic() - restarted
        token = await anyio.to_thread.run_sync(mesh.token)
        async with httpx.AsyncClient(base_url=mesh.url, verify=mesh.context(),
                                     trust_env=False, timeout=20) as http:
            answer = await http.post("/agents/dispatch", json={
                "capability": "work", "arguments": {"k": 4}, "instance_id": instance},
                headers={"authorization": f"Bearer {token}"})
        started = time.monotonic()
        await connector.disconnect()
        return int(answer.json()["result"]["v"]), back, time.monotonic() - started

    try:
        value, back, disconnect = anyio.run(scenario)
    finally:
        mesh.stop()
    print(f"\n{adapter}: registered again {back:.2f} s after the restart began; "
          f"disconnect took {disconnect:.2f} s")
    assert value == 13
    assert disconnect < 5
