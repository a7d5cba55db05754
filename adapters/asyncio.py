"""svantic.v1 over plain asyncio (standard library only): an agent client and a mesh server.

Every decision is the runtimes' (`svantic_proto.agent_runtime`, `.mesh_runtime`); this module
dials or listens, and its transport (`_protocol.py`, shared with the anyio adapter on the
asyncio backend) moves bytes, with one timer per agent or mesh; `_tasks.py` runs handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from svantic_proto import (
    LocalProtocolError,
)
from svantic_proto.agent_runtime import Dial, StartHandler
from svantic_proto.capabilities import DispatchContext
from svantic_proto.errors import DispatchError, HandlerError
from svantic_proto.mesh_runtime import AdmissionNeeded

from . import _protocol, _tasks
from ._agent import AgentDriver
from ._mesh import AsyncAgentHandle, MeshDriver
from ._protocol import WRITE_BUFFER_LIMIT, AsyncioMeshApi, LoopTimer, ProtocolLink, listen

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

log = logging.getLogger("svantic.agent")


class Agent(LoopTimer, AgentDriver[Awaitable[str]]):
    """A connected-mode agent: dials the mesh, runs capability handlers, reconnects.

    `async with connect(...) as agent` returns once the first welcome is seen;
    `await agent.run()` keeps it connected until `stop()` or a final refusal
    (which raises the typed `HandshakeRejected`). `ready` is set while a session is up.
    """

    def _setup(self) -> None:
        self.ready = asyncio.Event()
        self._handlers: dict[str, asyncio.Task[None]] = {}
        self._dialling: _protocol.Dialling | None = None
        self._finished: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._clock: Callable[[], float] = lambda: asyncio.get_running_loop().time()
        self.runtime.tool_caller = self._call_tool

    async def _call_tool(self, tool: str, arguments: Any = None, **options: Any) -> Any:
        """`DispatchContext.call_tool` here: send the tool call, await its result."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        call_id = self.runtime.call_tool(tool, arguments, waiter=future, **options)
        try:
            return await future
        finally:
            self.runtime.forget_tool_call(call_id)

    def _now(self) -> float:
        return self._clock()

    def _dial(self, dial: Dial) -> None:
        self._dialling = _protocol.dial(self, dial, ProtocolLink)

    def _cancel_dial(self) -> None:
        if self._dialling is not None:
            self._dialling.cancel()
            self._dialling = None

    def _start_handler(self, start: StartHandler) -> None:
        _tasks.spawn_handler(self, start)

    def _cancel_handler(self, dispatch_id: str) -> None:
        task = self._handlers.get(dispatch_id)
        if task is not None:
            task.cancel()

    def _fetch_token(self, provider: Callable[[], Awaitable[str]]) -> None:
        asyncio.get_running_loop().create_task(self._fetch_token_async(provider))

    def _ready_changed(self, ready: bool) -> None:
        if ready:
            self.ready.set()
        else:
            self.ready.clear()

    def _stopped(self, error: BaseException | None) -> None:
        self._arm(None)
        finished = self._finished
        if finished is not None and not finished.done():
            if error is None:
                finished.set_result(None)
            else:
                finished.set_exception(error)

    async def run(self) -> None:
        """Stay connected until `stop()`; raise a final refusal (spec 5)."""
        if self._finished is not None:
            raise LocalProtocolError("this agent is already running")
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        self._finished = loop.create_future()
        self.runtime.start(self._now())
        self.pump.service()
        try:
            await asyncio.shield(self._finished)
        except asyncio.CancelledError:  # the caller gave up: stop at once
            self.runtime.stop(self._now(), 0)
            self.pump.service()
            raise
        finally:
            for task in list(self._handlers.values()):
                task.cancel()

    async def __aenter__(self) -> Agent:
        self._runner = asyncio.get_running_loop().create_task(self.run())
        ready = asyncio.ensure_future(self.ready.wait())
        await asyncio.wait({self._runner, ready}, return_when=asyncio.FIRST_COMPLETED)
        if self._runner.done():
            ready.cancel()
            self._runner.result()  # raises the final error
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self, grace: float | None = None) -> None:
        """close_request: finish in-flight work (up to the grace), then close 1000; at once
        while dialling or backing off. Returns once the agent has stopped."""
        self.runtime.stop(self._now(), grace)
        self.pump.service()
        finished = self._finished
        if finished is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(finished)
        runner = self._runner
        if runner is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner


connect = Agent
"""`async with connect(url, ...) as agent:` (connected and ready), or `await agent.run()`."""


class AgentLink(AsyncAgentHandle[ProtocolLink]):
    """The mesh's handle on one connected agent: `await dispatch(...)`, `await wait_closed()`."""

    __slots__ = ()


class MeshServer(LoopTimer, AsyncioMeshApi, MeshDriver[ProtocolLink]):
    """A mesh endpoint serving `GET /agents/connect` over TLS (spec 1-5).

    `verify_token(token)` returns claims with `tenant_id` (an object or a mapping) or
    raises; `lookup_instance(id)` returns an `InstanceRecord` or None; either may be a
    coroutine function. The keywords are `MeshDriver`'s.
    """

    def _setup(self) -> None:
        self._server: asyncio.Server | None = None
        self._http_tasks: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Event()
        self._shut: asyncio.Event | None = None
        self._clock: Callable[[], float] = lambda: asyncio.get_running_loop().time()

    def _now(self) -> float:
        return self._clock()

    def _new_handle(self, link: ProtocolLink) -> AgentLink:
        return AgentLink(self, link)

    def _admit_async(self, action: AdmissionNeeded[Any], claims: Any, record: Any) -> None:
        asyncio.get_running_loop().create_task(self._admission(action, claims, record))

    def _shutdown_complete(self) -> None:
        if self._shut is not None:
            self._shut.set()

    async def __aenter__(self) -> MeshServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, host: str = "127.0.0.1", port: int = 0, *,
                    reuse_port: bool = False) -> tuple[str, int]:
        """Listen on plain TCP (a large backlog, for reconnect storms); TLS is each link's.

        `reuse_port=True` (SO_REUSEPORT) lets several mesh processes listen on one port, the
        kernel spreading new connections among them (`svantic mesh --workers`)."""
        self._clock = asyncio.get_running_loop().time
        self._server, address = await listen(self, ProtocolLink, host, port,
                                             reuse_port=reuse_port)
        return address

    async def close(self, grace: float | None = None) -> None:
        """Graceful shutdown: close_request to every agent, wait the grace, 1001 for the rest."""
        if self._server is not None:
            self._server.close()
        if self._shut is None:
            self._shut = asyncio.Event()
            self._begin_close(grace)
        await self._shut.wait()
        self._arm(None)
        if self._server is not None:
            await self._server.wait_closed()
