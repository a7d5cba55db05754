"""An instance registry outage during the upgrade is a 503, which clients retry, not a refusal."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import pytest
import trustme
from svantic_adapters.asyncio import MeshServer

from svantic_proto import InstanceRecord, RetryDecision
from svantic_proto.backoff import classify_handshake_status


@dataclass(frozen=True)
class Claims:
    tenant_id: str = "t1"


def _registry_down(instance_id: str) -> InstanceRecord | None:
    raise ConnectionError("registry unreachable")


@pytest.mark.timeout(30)
def test_registry_outage_answers_503_and_the_client_retries() -> None:
    websockets = pytest.importorskip("websockets.asyncio.client")
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)

    async def scenario() -> int:
        server = MeshServer(ssl_context=server_tls, verify_token=lambda token: Claims(),
                            lookup_instance=_registry_down, dispatch_auth=None)
        host, port = await server.start()
        try:
            async with asyncio.timeout(10):
                try:
                    await websockets.connect(
                        f"wss://{host}:{port}/agents/connect?instance_id=a1", ssl=client_tls,
                        subprotocols=["svantic.v1"],
                        additional_headers={"Authorization": "Bearer t"},
                    )
                except Exception as exc:  # InvalidStatus carries the HTTP response
                    return int(exc.response.status_code)  # type: ignore[attr-defined]
            return 101
        finally:
            await server.close(grace=0)

    status = asyncio.run(scenario())
    assert status == 503
    assert classify_handshake_status(status, token_already_refreshed=False) is RetryDecision.RETRY
