"""Cuts at chosen byte offsets of a resuming connection (spec 5), where the random cuts of
test_no_loss.py only land now and then.

A resume token is single-use and each welcome carries the next one. When the connection that
resumes dies after the mesh sent its welcome but before the agent read it, the mesh has spent
the old token and the agent never saw the new one: the agent's next hello presents the spent
token, the session cannot resume, and the dispatch the mesh held fails `AGENT_DISCONNECTED`
at its caller, while the agent's handler still runs once. The tests pin that outcome (one
outcome, no second run) and the one of a cut just before the welcome, which does resume.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from faults_harness import Outcome, call, start_agents, start_mesh
from proxy import Fault, FaultProxy

AGENT_CONFIG = {"reconnect_base_delay": 0.05, "reconnect_max_delay": 0.2}


@pytest.mark.parametrize(("where", "expected"), [
    ("inside the welcome", (502, "AGENT_DISCONNECTED")),
    ("before the welcome", (200, None)),
])
def test_a_cut_of_the_resuming_connection(tmp_path: Path, where: str,
                                          expected: tuple[int, str | None]) -> None:
    with FaultProxy() as proxy:
        mesh = start_mesh(tmp_path, config={"resume_window": 10.0},
                          public_url=f"https://127.0.0.1:{proxy.port}")
        agents = None
        try:
            proxy.upstream = ("127.0.0.1", mesh.port)
            agents = start_agents(mesh, prefix="wc", count=1, config=AGENT_CONFIG)
            first = proxy.wait_links(1)[0]
            # Everything the mesh sent on a fresh connection, up to and with its welcome (its
            # pings come 15 s later): TLS, the 101, the welcome. A resumed welcome is longer
            # (it lists the replayed dispatch), the bytes before it the same.
            through_welcome = first.sent["down"]
            token = mesh.token()

            async def scenario() -> Outcome:
                async with httpx.AsyncClient(base_url=mesh.url, verify=mesh.context(),
                                             trust_env=False, timeout=30) as http:
                    pending = asyncio.ensure_future(call(http, token, 7, sleep=2.0, tell=True))
                    await asyncio.to_thread(agents.lines.first, "run ", 10)
                    cut_at = through_welcome - 1 if where == "inside the welcome" else 200
                    proxy.next_fault = Fault(cut_after={"down": cut_at})
                    first.reset()
                    return await asyncio.wait_for(pending, 30)

            outcome = asyncio.run(scenario())
            runs = agents.finish()
        finally:
            if agents is not None:
                agents.kill()
            mesh.stop()
    cut = proxy.links[1]
    sessions = [" ".join(line.split()[2:]) for line in agents.lines.lines
                if line.startswith("up ")]
    print(f"\ncut {where} (byte {cut.sent['down']} of {through_welcome}): caller got "
          f"{(outcome.status, outcome.code)}; sessions {sessions}")
    assert cut.how == "reset"
    assert (outcome.status, outcome.code) == expected
    assert list(runs.values()) == [1]  # the handler ran once either way
