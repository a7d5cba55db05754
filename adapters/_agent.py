"""What every driver's `Agent` shares: the runtime, the capability API, and the runtime's
actions handed to the driver's own I/O and concurrency.

The decisions (when to dial, back off, refresh the token, stop, answer a handler) are the
`AgentRuntime`'s; this module only routes its actions. A driver supplies how to dial, how
to start and cancel a handler, one timer, and how to wake whoever waits for the end.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from svantic_proto import AgentConnection, AgentSession, Config, DispatchAuthVerifier
from svantic_proto.agent_runtime import (
    AbortTransport,
    AgentRuntime,
    CancelHandler,
    Dial,
    FetchToken,
    StartHandler,
    Stopped,
)
from svantic_proto.capabilities import Capability, CapabilityRegistry, Handler
from svantic_proto.events import ConnectionClosed, Event, SessionStarted

from ._dial import dial_failure
from ._pump import DETACHED, Pump

__all__ = ["AgentDriver", "client_ssl_context"]

log = logging.getLogger("svantic.agent")
TokenT = TypeVar("TokenT")


class Transport(Protocol):
    """What the driver's connection object offers the shared code."""

    pump: Pump

    def write(self, chunks: list[bytes]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def client_ssl_context(ssl_context: ssl.SSLContext | None, cafile: str | None) -> ssl.SSLContext:
    """The TLS context for `wss://`: the caller's, or the system's plus a private CA file."""
    if ssl_context is not None:
        return ssl_context
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["http/1.1"])
    return context


class AgentDriver(Generic[TokenT]):
    """A connected-mode agent (spec 1, 3, 5): the runtime's actions to the driver's hooks.

    `TokenT` is what `token_provider` returns: a `str`, or an awaitable of one.
    """

    def __init__(self, url: str, *, token: str, instance_id: str,
                 dispatch_auth: DispatchAuthVerifier, agent_type: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, cafile: str | None = None,
                 config: Config | None = None, session: AgentSession | None = None,
                 token_provider: Callable[[], TokenT] | None = None,
                 allow_insecure_loopback: bool = False,
                 capabilities: CapabilityRegistry | None = None,
                 max_concurrent_sessions: int = 0) -> None:
        # `capabilities`: a registry defined elsewhere (the SDK's `Agent`), shared as is, so
        # what is added to it later is dispatchable at once; `max_concurrent_sessions`: the
        # runtime's limit (0: none), see `AgentRuntime`.
        self.runtime = AgentRuntime(
            url, token=token, instance_id=instance_id, dispatch_auth=dispatch_auth,
            agent_type=agent_type, config=config, session=session, capabilities=capabilities,
            token_refresher=token_provider is not None,
            allow_insecure_loopback=allow_insecure_loopback,
            max_concurrent_sessions=max_concurrent_sessions, wall_clock=time.time)
        self._ssl = client_ssl_context(ssl_context, cafile) if self.runtime.tls else None
        self._token_provider = token_provider
        self.link: Any = None
        """The current transport, while one is open."""
        self.on_event: Callable[[Event], object] | None = None
        """Told every core event (session started, connection closed, ...), for metrics."""
        self.pump = Pump(self.runtime, on_event=self._act, write=self._write,
                         close=self._close_transport, arm_timer=self._arm_lazily, latch=False)
        self.runtime.on_output = self.pump.service
        self._armed: float | None = None
        self._setup()

    # -- what users read -----------------------------------------------------------------

    @property
    def instance_id(self) -> str:
        return self.runtime.instance_id

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def session(self) -> AgentSession:
        return self.runtime.session

    @property
    def conn(self) -> AgentConnection | None:
        """The current (or last) core connection."""
        return self.runtime.conn

    @property
    def handler_runs(self) -> int:
        return self.runtime.handler_runs

    @property
    def last_closed(self) -> ConnectionClosed | None:
        return self.runtime.last_closed

    @property
    def last_started(self) -> SessionStarted | None:
        return self.runtime.last_started

    def capability(self, name: str | None = None, *, description: str = "",
                   parameters: Mapping[str, Any] | None = None, blocking: bool = False
                   ) -> Callable[[Handler], Handler]:
        """Decorator: define a capability; its JSON Schema `parameters` is checked now.
        `blocking=True`: a plain function that may block runs in a worker thread."""
        return self.runtime.capabilities.capability(name, description=description,
                                                    parameters=parameters, blocking=blocking)

    def add(self, name: str, handler: Handler, *, description: str = "",
            parameters: Mapping[str, Any] | None = None, blocking: bool = False
            ) -> Capability:
        """Define a capability without the decorator."""
        return self.runtime.capabilities.add(name, handler, description=description,
                                             parameters=parameters, blocking=blocking)

    def set_max_concurrent_sessions(self, limit: int) -> None:
        """Change how many handlers run at once (0: no limit); heartbeats report it."""
        self.runtime.set_max_concurrent_sessions(limit)
        self.pump.service()

    def refresh_token(self, token: str) -> bool:
        """Use a fresh transport JWT: now through `token_refresh`, and for every reconnect.

        Returns False when it could not go out now; the next reconnect uses it (spec 3).
        """
        sent = self.runtime.refresh_token(token)
        self.pump.service()
        return sent

    # -- hooks each driver implements ----------------------------------------------------

    def _setup(self) -> None:
        """The driver's own state (ready event, running handlers, timer); called last by
        `__init__`, so every driver keeps the one keyword signature above."""

    def _now(self) -> float:
        raise NotImplementedError

    def _arm(self, deadline: float | None) -> None:
        raise NotImplementedError

    def _dial(self, dial: Dial) -> None:
        """Open the transport; then `_opened` or `_dial_failed`."""
        raise NotImplementedError

    def _cancel_dial(self) -> None:
        raise NotImplementedError

    def _start_handler(self, start: StartHandler) -> None:
        raise NotImplementedError

    def _cancel_handler(self, dispatch_id: str) -> None:
        raise NotImplementedError

    def _fetch_token(self, provider: Callable[[], TokenT]) -> None:
        """Call the provider in the driver's concurrency, then `_token_fetched`."""
        raise NotImplementedError

    def _ready_changed(self, ready: bool) -> None:
        raise NotImplementedError

    def _stopped(self, error: BaseException | None) -> None:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------

    def _act(self, action: object) -> None:
        kind = type(action)
        if kind is StartHandler:
            self._start_handler(action)  # type: ignore[arg-type]
        elif kind is CancelHandler:
            self._cancel_handler(action.dispatch_id)  # type: ignore[attr-defined]
        elif kind is Dial:
            self._dial(action)  # type: ignore[arg-type]
        elif kind is AbortTransport:
            self._cancel_dial()
            link, self.link = self.link, None
            if link is not None:
                link.pump = DETACHED
                link.abort()
        elif kind is FetchToken:
            if self._token_provider is not None:
                self._fetch_token(self._token_provider)
        elif kind is Stopped:
            self._stopped(action.error)  # type: ignore[attr-defined]
        else:
            if kind is SessionStarted:
                self._ready_changed(True)
            elif kind is ConnectionClosed:
                self._ready_changed(False)
            if self.on_event is not None:
                try:
                    self.on_event(action)  # type: ignore[arg-type]
                except Exception:  # an application callback must not stop the agent
                    log.exception("on_event failed")

    def _opened(self, attempt: int, link: Transport) -> bool:
        """A dialled transport is ready (TLS done): hand it to the runtime, or drop it."""
        if not self.runtime.transport_open(attempt, self._now()):
            link.abort()
            return False
        self.link = link
        link.pump = self.pump
        self.pump.service()
        return True

    def _dial_failed(self, attempt: int, error: BaseException) -> None:
        kind, reason = dial_failure(error)
        self.runtime.dial_failed(attempt, kind, reason, self._now())
        self.pump.service()

    async def _fetch_token_async(self, provider: Callable[[], Any]) -> None:
        """The token step on an async driver, run in a task of its own."""
        try:
            token: str | None = await provider()
        except Exception:
            log.exception("%s: the token provider failed", self.instance_id)
            token = None
        self._token_fetched(token)

    def _token_fetched(self, token: str | None) -> None:
        self.runtime.token_fetched(token, self._now())
        self.pump.service()

    def _write(self, chunks: list[bytes]) -> None:
        if self.link is not None:
            self.link.write(chunks)

    def _close_transport(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.pump = DETACHED  # what it still reads is not the next connection's
            link.close()

    def _arm_lazily(self, deadline: float | None) -> None:
        """Move the timer only when the deadline came earlier: one that fires early finds
        nothing due, and the pump then arms the real one (no timer churn per dispatch)."""
        armed = self._armed
        if deadline is not None and (armed is None or deadline < armed):
            self._armed = deadline
            self._arm(deadline)

    def _fire(self) -> None:
        self._armed = None
        self.pump.timer(self._now())

    def _returned(self, dispatch_id: str, result: Any) -> None:
        self.runtime.handler_returned(dispatch_id, result)
        self.pump.service()

    def _raised(self, dispatch_id: str, exc: BaseException) -> None:
        self.runtime.handler_raised(dispatch_id, exc)
        self.pump.service()

    def _cancelled(self, dispatch_id: str) -> None:
        self.runtime.handler_cancelled(dispatch_id)
        self.pump.service()
