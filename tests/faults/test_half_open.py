"""Half-open TCP: the path between an agent and the mesh goes silent without a FIN or an RST
(the proxy blackholes it). Spec 4: a peer from which nothing at all arrives for the dead-peer
timeout is dead; the mesh closes (1001) and the agent drops the socket and reconnects. Both
ends must see it within that bound plus one second, and the agent must come back by itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from faults_harness import Events, start_agents, start_mesh
from proxy import FaultProxy

DEAD_PEER = 2.0
TIMERS = {"dead_peer_timeout": DEAD_PEER, "ws_ping_interval": 0.5, "app_ping_interval": 0.5,
          "app_ping_offset": 0.25, "heartbeat_interval": 0.5}


@pytest.mark.parametrize("adapter", ["asyncio", "gevent"])
def test_both_ends_detect_a_silent_path_within_the_dead_peer_bound(tmp_path: Path,
                                                                    adapter: str) -> None:
    with FaultProxy() as proxy:
        mesh = start_mesh(tmp_path, adapter=adapter, config=TIMERS,
                          public_url=f"https://127.0.0.1:{proxy.port}")
        agents = None
        try:
            proxy.upstream = ("127.0.0.1", mesh.port)
            events = Events(mesh)
            instance = f"ho-{adapter}-0"
            agents = start_agents(mesh, prefix=f"ho-{adapter}", count=1, adapter=adapter,
                                  config={**TIMERS, "reconnect_base_delay": 0.1,
                                          "reconnect_max_delay": 0.2})
            link = proxy.wait_links(1)[0]
            blackholed = time.monotonic()
            link.blackhole()
            agent_saw = agents.lines.when(f"down {instance}", DEAD_PEER + 5, blackholed)
            mesh_saw = events.when("agent.disconnected", instance, DEAD_PEER + 5, blackholed)
            back = agents.lines.wait(lambda lines: any(
                line.startswith(f"up {instance}") for line in lines[2:]), 10, "reconnect")
            silent = link.live  # the proxy never closed it: only the peers' timers ended it
        finally:
            if agents is not None:
                agents.kill()
            mesh.stop()
    agent_delay, mesh_delay = agent_saw - blackholed, mesh_saw - blackholed
    print(f"\n{adapter}: dead-peer {DEAD_PEER} s; agent noticed after {agent_delay:.2f} s, "
          f"mesh after {mesh_delay:.2f} s")
    assert silent
    assert DEAD_PEER - 0.1 <= agent_delay <= DEAD_PEER + 1, agent_delay
    assert DEAD_PEER - 0.1 <= mesh_delay <= DEAD_PEER + 1, mesh_delay
    assert back
