"""What the tests running our ASGI apps under uvicorn share: a certificate for 127.0.0.1,
a bounded `asyncio.run`, and uvicorn's server without its signal handlers."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass

import pytest
import trustme
import uvicorn

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Certs:
    certfile: str
    client: ssl.SSLContext


@pytest.fixture(scope="module")  # offered to the interop tests by their conftest
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("asgi-tls") / "server.pem"
    authority.issue_cert(HOST).private_key_and_cert_chain_pem.write_to_path(str(path))
    client = ssl.create_default_context()
    authority.configure_trust(client)
    return Certs(str(path), client)


def run(scenario: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await scenario
    asyncio.run(bounded())


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: pytest keeps its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
