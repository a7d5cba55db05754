"""svantic.v1 over plain asyncio (standard library only): an agent client and a mesh server.

Every protocol decision is the core's; the transport (`_protocol.py`, shared with the
anyio adapter on the asyncio backend) reads and writes bytes, keeps one timer per
connection at the core's deadline, and starts handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from svantic_proto import AgentConnection, RetryDecision
from svantic_proto.events import DispatchReceived, SessionStarted

from ._protocol import WRITE_BUFFER_LIMIT, ProtocolLink, dial_agent, dispatch, listen, spawn_handler
from ._runtime import (
    AgentBase,
    AgentLinkBase,
    DispatchContext,
    DispatchError,
    HandlerError,
    MeshBase,
)

__all__ = [
    "WRITE_BUFFER_LIMIT",
    "Agent",
    "AgentLink",
    "DispatchContext",
    "DispatchError",
    "HandlerError",
    "MeshServer",
    "connect",
]


class Agent(AgentBase[ProtocolLink, Awaitable[str]]):
    """A connected-mode agent: dials the mesh, runs capability handlers, reconnects.

    `async with connect(...) as agent` returns once the first welcome is seen;
    `await agent.run()` keeps it connected until `stop()` or a final refusal
    (which raises the typed `HandshakeRejected`).
    """

    def _init_adapter(self) -> None:
        self.ready = asyncio.Event()

    def _clock(self) -> float:
        return asyncio.get_running_loop().time()

    async def _connect_once(self) -> ProtocolLink:
        return await dial_agent(self, ProtocolLink, self.ready.clear)

    def _session_started(self, event: SessionStarted) -> None:
        self.ready.set()

    def _spawn_handler(self, handler: Callable[..., Any], event: DispatchReceived,
                       context: DispatchContext) -> None:
        spawn_handler(self, handler, event, context)

    async def connections(self) -> AsyncIterator[AgentConnection]:
        """Yield each established connection; reconnect with the core's backoff and retry rules."""
        while not self._stopping:
            retry: RetryDecision
            try:
                link = await self._connect_once()
                ended = asyncio.ensure_future(link.done.wait())
                ready = asyncio.ensure_future(self.ready.wait())
                await asyncio.wait({ended, ready}, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if self.ready.is_set():
                    yield link.pump.conn
                await ended
                retry = self._retry_decision()
            except (TimeoutError, OSError):  # a TLS failure is a `TlsError`, an OSError
                retry = RetryDecision.RETRY
            if self._stopping:
                return
            if provider := self._token_refresher(retry):
                self._use_fresh_token(await provider())
            await asyncio.sleep(self.session.next_delay())

    async def run(self) -> None:
        async for _ in self.connections():
            pass

    async def __aenter__(self) -> Agent:
        self._runner = asyncio.create_task(self.run())
        waiter = asyncio.create_task(self.ready.wait())
        await asyncio.wait({self._runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if self._runner.done():
            waiter.cancel()
            self._runner.result()  # raises the final error
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self, grace: float | None = None) -> None:
        """close_request: finish in-flight work (up to the grace), then close 1000."""
        link = self._begin_stop(grace)
        if link is not None:
            await link.done.wait()
        runner = getattr(self, "_runner", None)
        if runner is not None and not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner


def connect(url: str, **options: Any) -> Agent:
    """`async with connect(url, ...) as agent:`, or `async for conn in agent.connections()`."""
    return Agent(url, **options)


class AgentLink(AgentLinkBase["MeshServer", ProtocolLink]):
    """The mesh's handle on one connected agent: send dispatches, await their outcome."""

    async def wait_closed(self) -> None:
        """Until this agent's connection has ended."""
        await self.link.done.wait()

    async def dispatch(self, capability: str, arguments: Mapping[str, Any] | None = None, *,
                       deadline_ms: int = 30_000,
                       on_chunk: Callable[[Any], object] | None = None) -> Any:
        """Send a dispatch and return its result; raise `DispatchError` on failure."""
        return await dispatch(self, capability, arguments, deadline_ms, on_chunk)


class MeshServer(MeshBase[AgentLink, ProtocolLink]):
    """A mesh endpoint serving `GET /agents/connect` over TLS (spec 1-5).

    `verify_token(token)` returns claims with `tenant_id` (and optionally `exp`,
    `sub`) or raises; `lookup_instance(id)` returns an `InstanceRecord` or None.
    """

    def _init_adapter(self) -> None:
        self.agent_connected = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._store_timer: asyncio.TimerHandle | None = None
        self._notify_task: asyncio.Future[None] | None = None

    def _clock(self) -> float:
        return asyncio.get_running_loop().time()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on plain TCP (a large backlog, for reconnect storms); TLS is each link's."""
        self._server, address = await listen(self, ProtocolLink, host, port)
        return address

    async def wait_for_agent(self, instance_id: str, timeout: float = 10.0) -> AgentLink:
        async def ready() -> AgentLink:
            async with self.agent_connected:
                await self.agent_connected.wait_for(lambda: instance_id in self.agents)
                return self.agents[instance_id]
        return await asyncio.wait_for(ready(), timeout)

    async def dispatch(self, instance_id: str, capability: str,
                       arguments: Mapping[str, Any] | None = None, **options: Any) -> Any:
        return await self._available_agent(instance_id).dispatch(capability, arguments, **options)

    def _new_agent_link(self, link: ProtocolLink) -> AgentLink:
        return AgentLink(self, link)

    def _agent_arrived(self) -> None:
        self._notify_task = asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self.agent_connected:
            self.agent_connected.notify_all()

    def _arm_store_timer(self) -> None:
        if self._store_timer is not None:
            self._store_timer.cancel()
        deadline = self.store.next_deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._store_timer = loop.call_at(deadline, lambda: self._expire_store(loop.time()))

    async def close(self, grace: float | None = None) -> None:
        """Graceful shutdown: close_request to every agent, wait the grace, 1001 for the rest."""
        if self._server is not None:
            self._server.close()
        grace = self._request_close_all(grace)
        pending = [asyncio.ensure_future(link.done.wait()) for link in self.links]
        if pending:
            await asyncio.wait(pending, timeout=grace + self.config.close_timeout)
        self._close_all()
        if self._store_timer is not None:
            self._store_timer.cancel()
        self.waiters.fail_all("AGENT_DISCONNECTED", "mesh shut down")
        if self._server is not None:
            await self._server.wait_closed()

