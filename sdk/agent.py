"""`Agent`: what an agent is (its type and its capabilities), apart from how it reaches a mesh.

An `Agent` holds a `svantic_proto` `CapabilityRegistry`, which every transport runs as is:
the connected-mode adapters take it whole (so a capability defined at run time is
dispatchable at once, and routable after `MeshConnector.re_register()`), and hosted mode
answers `POST /send` from it. Each capability's JSON Schema is compiled when it is defined,
so a bad schema fails there, and arguments are checked before the handler runs
(`INVALID_ARGUMENTS`, with the validator's message).

Handlers are `handler(args, ctx)`. A coroutine function runs in the event loop; a plain
function may block, so on the async adapters it runs in a worker thread (its `ctx.chunk` and
`ctx.tool_call` are carried back to the loop's thread), and on gevent in its own greenlet.
`ctx` is a `Context`: the dispatch's ids, deadline, trace context, streaming, tool calls and
cancellation.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from svantic_proto.capabilities import CapabilityRegistry, DispatchContext
from svantic_proto.errors import LocalProtocolError

if TYPE_CHECKING:
    from .connector import MeshConnector

__all__ = ["Agent", "CapabilitySpec", "Context", "Handler"]

Handler = Callable[[Mapping[str, Any], "Context"], Any]
"""`handler(args, ctx)`: returns the result, or (a coroutine function) an awaitable of it."""
H = TypeVar("H", bound=Callable[..., Any])

_OBJECT_SCHEMA: Mapping[str, Any] = MappingProxyType({"type": "object"})


@dataclass(frozen=True, slots=True)
class CapabilitySpec:
    """What the mesh is told about one capability (a `tools` entry of the registration)."""

    name: str
    description: str
    parameters: Mapping[str, Any] | None

    def tool(self) -> dict[str, Any]:
        """The registration's `tools` entry: `{name, description, parameters}` (an object
        schema when the capability declared none: dispatch arguments are always one)."""
        parameters = self.parameters if self.parameters is not None else _OBJECT_SCHEMA
        return {"name": self.name, "description": self.description,
                "parameters": dict(parameters)}


class Context:
    """What a handler gets besides its arguments. Wraps the core's `DispatchContext` (which,
    sans-IO, reads no clock) and adds what needs one: `time_left()` and `wait_cancelled()`
    count from when the handler started.

    `cancelled` is true once the mesh cancelled the dispatch or its deadline passed.
    `await ctx.tool_call(...)` runs another agent's capability through the mesh (blocking
    on gevent, and in a plain handler, which runs in a worker thread)."""

    __slots__ = ("_cancel_waiters", "_started", "agent", "dispatch")

    def __init__(self, dispatch: DispatchContext, agent: Agent | None = None,
                 started: float | None = None) -> None:
        self.dispatch = dispatch
        """The core's context, for what this class does not wrap."""
        self.agent = agent
        self._started = time.monotonic() if started is None else started
        self._cancel_waiters: list[Callable[[], object]] = []
        dispatch.on_cancel = self._cancelled_now

    # -- ids ---------------------------------------------------------------------------------

    @property
    def dispatch_id(self) -> str:
        return self.dispatch.dispatch_id

    @property
    def task_id(self) -> str | None:
        return self.dispatch.task_id

    @property
    def capability(self) -> str:
        return self.dispatch.capability

    @property
    def attempt(self) -> int:
        return self.dispatch.attempt

    @property
    def session_id(self) -> str | None:
        context = self.dispatch.session_context
        return context.session_id if context is not None else None

    @property
    def tenant_id(self) -> str | None:
        context = self.dispatch.session_context
        return context.tenant_id if context is not None else None

    # -- trace context -----------------------------------------------------------------------

    @property
    def parent_trace_id(self) -> str | None:
        return self.dispatch.trace.parent_trace_id

    @property
    def parent_span_id(self) -> str | None:
        return self.dispatch.trace.parent_span_id

    @property
    def baggage(self) -> Mapping[str, str]:
        return self.dispatch.trace.baggage

    # -- time --------------------------------------------------------------------------------

    @property
    def deadline_ms(self) -> int:
        return self.dispatch.deadline_ms

    def time_left(self) -> float:
        """Seconds until the dispatch's deadline (0 once it passed), from the handler's
        start: the mesh's own clock started a little earlier, so this errs long by the
        time the dispatch spent in transit."""
        elapsed = time.monotonic() - self._started
        return max(0.0, self.dispatch.deadline_ms / 1000 - elapsed)

    # -- streaming and tool calls -------------------------------------------------------------

    def chunk(self, data: Any) -> None:
        """Stream one chunk to the caller (any JSON value), before the result."""
        self.dispatch.chunk(data)

    def tool_call(self, tool: str, arguments: Mapping[str, Any] | None = None, *,
                  agent_type: str | None = None, instance_id: str | None = None,
                  deadline_ms: int | None = None) -> Any:
        """Run `tool` (another agent's capability) through the mesh and get its result:
        awaitable in a coroutine handler, blocking in a plain one and on gevent. A failure
        raises `svantic_proto.DispatchError` with the mesh's code; a handler that lets it
        through answers with that code."""
        return self.dispatch.call_tool(tool, arguments, deadline_ms=deadline_ms,
                                       agent_type=agent_type, instance_id=instance_id)

    call_tool = tool_call
    """The core's name for `tool_call`."""

    # -- cancellation ------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the mesh cancelled the dispatch, or its deadline passed."""
        return self.dispatch.cancelled or self.time_left() <= 0

    async def wait_cancelled(self) -> None:
        """Return once the dispatch is cancelled or its deadline passes (asyncio or trio).

        On the async adapters a cancel also interrupts the handler's task, so this await
        may end by raising the loop's cancellation instead; let it propagate (clean up in
        `finally`)."""
        if self.cancelled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            future: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                if not future.done():
                    future.set_result(None)

            self._cancel_waiters.append(wake)
            try:
                async with asyncio.timeout(self.time_left()):
                    await future
            except TimeoutError:
                return
            finally:
                self._cancel_waiters.remove(wake)
            return
        import anyio  # not on asyncio: trio, through the anyio adapter

        event = anyio.Event()
        self._cancel_waiters.append(event.set)
        try:
            with anyio.move_on_after(self.time_left()):
                await event.wait()
        finally:
            self._cancel_waiters.remove(event.set)

    def _cancelled_now(self) -> None:
        """`DispatchContext.on_cancel`: in the driver's thread (the loop's)."""
        for wake in list(self._cancel_waiters):
            wake()

    def __repr__(self) -> str:
        return (f"Context(dispatch_id={self.dispatch_id!r}, capability={self.capability!r}, "
                f"attempt={self.attempt}, session_id={self.session_id!r})")


def _is_async(handler: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004  # an object with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


class Agent:
    """An agent: its type, a description, and capabilities (`capability`,
    `define_capability`). Connect it with `await agent.start(...)` or `agent.run(...)`
    (a `MeshConnector` underneath), or serve it hosted (`svantic.hosted`).

    `max_concurrent_sessions` (0: no limit) bounds the dispatches it runs at once: it is
    registered with the mesh (which stops routing at the limit), reported in heartbeats,
    and enforced by the transport (a dispatch beyond it is refused `AGENT_UNAVAILABLE`)."""

    def __init__(self, agent_type: str, description: str = "", *,
                 max_concurrent_sessions: int = 0, version: str = "0.1.0",
                 agent_card: Mapping[str, Any] | None = None) -> None:
        if not isinstance(agent_type, str) or not agent_type.strip():
            raise ValueError("agent_type must be a non-empty string")
        if (isinstance(max_concurrent_sessions, bool)
                or not isinstance(max_concurrent_sessions, int) or max_concurrent_sessions < 0):
            raise ValueError("max_concurrent_sessions must be an integer >= 0")
        self.agent_type = agent_type
        self.description = description
        self.max_concurrent_sessions = max_concurrent_sessions
        self.version = version
        self._card = dict(agent_card) if agent_card is not None else None
        self.registry = CapabilityRegistry()
        """The core registry the transports run (handlers wrapped to take a `Context`)."""
        self._specs: dict[str, CapabilitySpec] = {}
        self._handlers: dict[str, Callable[..., Any]] = {}
        self.connector: MeshConnector | None = None
        """The connector of `start()` / `run()`, while one is connected."""

    # -- capabilities -----------------------------------------------------------------------

    @property
    def capabilities(self) -> Mapping[str, CapabilitySpec]:
        """Name -> `CapabilitySpec`, in definition order (read-only)."""
        return MappingProxyType(self._specs)

    def handler(self, name: str) -> Callable[..., Any]:
        """The function given for capability `name` (KeyError when there is none)."""
        return self._handlers[name]

    @overload
    def capability(self, name: H, /) -> H: ...

    @overload
    def capability(self, name: str | None = None, /, *, description: str | None = None,
                   parameters: Mapping[str, Any] | None = None) -> Callable[[H], H]: ...

    def capability(self, name: Any = None, /, *, description: str | None = None,
                   parameters: Mapping[str, Any] | None = None) -> Any:
        """Decorator: define a capability. The name defaults to the function's, the
        description to its docstring; `parameters` is the arguments' JSON Schema (draft
        2020-12 unless it says `$schema`), checked now. `@agent.capability` works bare."""
        if callable(name):
            function = name
            self.define_capability(function.__name__, None, None, function)
            return function

        def register(function: H) -> H:
            self.define_capability(name or function.__name__, description, parameters,
                                   function)
            return function

        return register

    def define_capability(self, name: str, description: str | None,
                          parameters: Mapping[str, Any] | None,
                          handler: Callable[..., Any]) -> CapabilitySpec:
        """Define (or replace) a capability without the decorator. Raises ValueError for a
        bad name or handler, or a schema that is not valid JSON Schema."""
        if not callable(handler):
            raise ValueError(f"the handler of {name!r} is not callable")
        if description is None:
            description = inspect.cleandoc(handler.__doc__ or "")
        is_async = _is_async(handler)
        wrapped = self._wrap(handler, is_async)
        try:
            self.registry.add(name, wrapped, description=description, parameters=parameters,
                              blocking=not is_async)
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from None
        spec = CapabilitySpec(name, description, parameters)
        self._specs[name] = spec
        self._handlers[name] = handler
        return spec

    def remove_capability(self, name: str) -> bool:
        """Forget a capability (call `re_register()` so the mesh forgets it too)."""
        self._specs.pop(name, None)
        self._handlers.pop(name, None)
        return self.registry.remove(name)

    def _wrap(self, handler: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
        """The registry's handler: the core's `(arguments, DispatchContext)` to the user's
        `(args, Context)`; a coroutine function stays one (drivers await it)."""
        agent = self
        if is_async:
            async def run_async(arguments: Mapping[str, Any], dispatch: DispatchContext) -> Any:
                return await handler(arguments, Context(dispatch, agent))

            run_async.__name__ = getattr(handler, "__name__", "handler")
            return run_async

        def run(arguments: Mapping[str, Any], dispatch: DispatchContext) -> Any:
            return handler(arguments, Context(dispatch, agent))

        run.__name__ = getattr(handler, "__name__", "handler")
        return run

    # -- what the mesh is told ----------------------------------------------------------------

    def tools(self) -> list[dict[str, Any]]:
        """The registration's `tools`: one `{name, description, parameters}` per capability."""
        return [spec.tool() for spec in self._specs.values()]

    def agent_card(self, url: str | None = None) -> dict[str, Any]:
        """An A2A-readable agent card: the one given to the constructor, else one made from
        the type, description, version and capabilities (`skills`): `svantic.card`'s, which
        names the endpoint, when the agent is served at `url` (hosted mode)."""
        if self._card is not None:
            given = dict(self._card)
            if url is not None:
                given.setdefault("url", url)
            return given
        if url is not None:
            from .card import agent_card

            return agent_card(self, url)
        card: dict[str, Any] = {
            "name": self.agent_type,
            "description": self.description,
            "version": self.version,
            "protocolVersion": "0.3.0",
            "capabilities": {"streaming": True},
            "defaultInputModes": ["application/json"],
            "defaultOutputModes": ["application/json"],
            "skills": [{"id": spec.name, "name": spec.name, "description": spec.description,
                        "tags": [self.agent_type]} for spec in self._specs.values()],
        }
        return card

    # -- connecting in one line ----------------------------------------------------------------

    async def start(self, **options: Any) -> MeshConnector:
        """Connect in one line: a `MeshConnector(self, **options)`, connected (async
        adapters). Returns it; `await connector.disconnect()` ends it."""
        from .connector import MeshConnector

        connector = MeshConnector(self, **options)
        await connector.connect()
        self.connector = connector
        return connector

    def run(self, **options: Any) -> None:
        """Connect and stay connected until Ctrl-C or SIGTERM, then disconnect (blocking).

        `adapter` "asyncio" (default) runs an asyncio loop, "anyio" runs anyio on asyncio
        (`backend="trio"` for trio), "gevent" blocks in this greenlet."""
        from .connector import run_until_signal

        run_until_signal(self, options)

    def __repr__(self) -> str:
        return f"Agent(agent_type={self.agent_type!r}, capabilities={list(self._specs)})"
