"""The README's code runs: a user's first copy-paste must work.

"An agent" (the SDK) runs exactly as written, as its own process, against the reference mesh
in this process over real TLS on 127.0.0.1, configured as the README says, by `SVANTIC_*`
variables; it must connect and answer a dispatch. The adapter-level agent example is run
against an adapter's mesh; only the mesh address, the secret and the CA file are swapped in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from svantic_adapters.asyncio import MeshServer, connect

from svantic_proto import (
    DispatchAuthMinter,
    DispatchAuthVerifier,
    InstanceRecord,
    LocalProtocolError,
    jwt_dispatch_auth,
)

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
SECRET = "readme-test-signing-secret-of-32+bytes"
TOKEN = "<transport-JWT-from-POST-/auth/token>"
INSTANCE = "ticket-agent-1"


class _Claims:
    tenant_id = "t-1"
    sub = "readme"
    exp = time.time() + 3600


def _swap(source: str, old: str, new: str) -> str:
    assert old in source, f"the README example no longer contains {old!r}: update this test"
    return source.replace(old, new)


def test_readme_agent_example_serves_a_dispatch(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))

    async def scenario() -> None:
        server = MeshServer(
            ssl_context=server_tls,
            verify_token=lambda token: _Claims() if token == TOKEN else None,
            lookup_instance=lambda i: InstanceRecord(i, "t-1", "connected", "ticket-agent")
            if i == INSTANCE
            else None,
            dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SECRET)),
        )
        host, port = await server.start("127.0.0.1", 0)
        source = next(block for block in BLOCKS if "svantic_adapters.asyncio import" in block)
        source = _swap(source, "wss://mesh.example/agents/connect",
                       f"wss://{host}:{port}/agents/connect")
        source = _swap(source, "<SIGNING_SECRET>", SECRET)
        source = _swap(source, "cafile=None", f"cafile={str(cafile)!r}")
        run = "    await agent.run()"
        source = _swap(source, run, f"    AGENTS.append(agent)\n{run}")
        source = _swap(source, "asyncio.run(main())", "")
        namespace: dict[str, Any] = {"AGENTS": []}
        exec(compile(source, "README.md", "exec"), namespace)
        running = asyncio.ensure_future(namespace["main"]())
        try:
            await server.wait_for_agent(INSTANCE, timeout=10)
            result = await asyncio.wait_for(
                server.dispatch(INSTANCE, "get_ticket", {"ticket_id": "T-7"}), 10)
            assert result == {"id": "T-7", "status": "open"}
        finally:
            for agent in namespace["AGENTS"]:
                await agent.stop()
            await asyncio.wait_for(running, 10)
            await server.close(grace=0)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def _sdk_block() -> str:
    """The README's "An agent" block: the first Python block, and at most 15 lines."""
    heading = README.index("\n## An agent\n")
    block = re.search(r"```python\n(.*?)```", README[heading:], re.S)
    assert block is not None and block.group(1) == BLOCKS[0], "An agent: no Python block first"
    source = block.group(1)
    assert len(source.splitlines()) <= 15, "the README's agent is more than 15 lines"
    assert "import svantic\n" in source and "agent.run()" in source
    return source


def test_readme_agent_runs_as_written_against_the_reference_mesh(tmp_path: Path) -> None:
    import anyio
    import httpx
    from svantic_mesh.demo import local_mesh

    source = _sdk_block()
    script = tmp_path / "tickets.py"
    script.write_text(source)
    instance_id = "readme-tickets-1"

    async def scenario() -> None:
        async with local_mesh("asyncio") as mesh:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SVANTIC_")}
            env.update(mesh.environ(), SVANTIC_INSTANCE_ID=instance_id)
            process = await anyio.open_process([sys.executable, str(script)], env=env,
                                               cwd=tmp_path)
            try:
                try:
                    await mesh.server.wait_for_agent(instance_id, 20)
                except TimeoutError:
                    raise AssertionError("the README's agent did not connect (exit status "
                                         f"{process.returncode})") from None
                verify = ssl.create_default_context(cafile=mesh.ca_file)
                async with httpx.AsyncClient(base_url=mesh.url, verify=verify, timeout=10,
                                             trust_env=False) as http:
                    token = (await http.post("/auth/token", json={
                        "client_id": mesh.client_id, "client_secret": mesh.client_secret,
                    })).raise_for_status().json()["access_token"]
                    answer = await http.post(
                        "/agents/dispatch", headers={"authorization": f"Bearer {token}"},
                        json={"capability": "get_ticket", "arguments": {"ticket_id": "T-7"},
                              "agent_type": "tickets"})
                assert answer.status_code == 200, answer.text
                assert answer.json()["result"] == {"id": "T-7", "status": "open"}
                assert answer.json()["instance_id"] == instance_id
            finally:
                if process.returncode is None:
                    process.send_signal(signal.SIGINT)  # Ctrl-C: it deregisters and exits
                with anyio.fail_after(15):
                    code = await process.wait()
                output = b""
                for stream in (process.stdout, process.stderr):
                    if stream is not None:
                        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
                            output += await stream.receive(1 << 16)
                await process.aclose()
            assert code == 0, output.decode(errors="replace")

    anyio.run(scenario, backend="asyncio")


def test_readme_sans_io_example_starts_a_handshake() -> None:
    from svantic_proto import AgentConnection

    source = next(block for block in BLOCKS if "AgentConnection(" in block)
    namespace: dict[str, Any] = {
        "url": "wss://mesh.example/agents/connect",
        "token": "t",
        "verifier": DispatchAuthVerifier("a-1", hs256_keys=[SECRET]),
        "monotonic": time.monotonic,
        "time": time,
    }
    exec(compile(source, "README.md", "exec"), namespace)
    conn = namespace["conn"]
    assert isinstance(conn, AgentConnection)
    request = conn.data_to_send()[0]
    assert request.startswith(b"GET /agents/connect?instance_id=a-1 HTTP/1.1\r\n")


def test_a_bad_token_is_refused_when_the_agent_is_made() -> None:
    """Not later, inside a connect attempt, where it could only be logged."""
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET])
    with pytest.raises(LocalProtocolError, match="token"):
        connect("wss://127.0.0.1:1/agents/connect", token="has spaces", instance_id=INSTANCE,
                dispatch_auth=verifier)
