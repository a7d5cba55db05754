"""Glue shared by every adapter: no I/O, no event loop, no protocol decisions.

The core decides what the protocol requires; this module only maps core
events to application calls the same way for asyncio, anyio and gevent:
capability handlers on the agent side, and waiters for dispatch outcomes on
the mesh side. Each adapter supplies how to start a task and how to wake one.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from svantic_proto.errors import SvanticError
from svantic_proto.events import (
    ChunkReceived,
    DispatchCompleted,
    DispatchFailed,
    DispatchReceived,
    DispatchTimedOut,
    Event,
)
from svantic_proto.frames import SessionContext
from svantic_proto.trace import SessionTraceContext, trace_context_from_headers

__all__ = [
    "Capability",
    "CapabilityRegistry",
    "DispatchContext",
    "DispatchError",
    "HandlerError",
    "MeshWaiters",
    "client_ssl_context",
    "handler_outcome",
]


class DispatchError(SvanticError):
    """A dispatch ended without a result: `code` is the agent's or the mesh's (spec 3)."""

    def __init__(self, dispatch_id: str, code: str, message: str | None = None,
                 detail: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.dispatch_id = dispatch_id
        self.code = code
        self.message = message
        self.detail = detail


class HandlerError(Exception):
    """Raise from a capability handler to answer with your own error code (spec 3)."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Capability:
    name: str
    handler: Callable[..., Any]
    description: str = ""
    parameters: Mapping[str, Any] | None = None
    """JSON Schema of the arguments; failures answer INVALID_ARGUMENTS (spec 3)."""
    validator: Any = None


@dataclass(slots=True)
class DispatchContext:
    """What a handler gets besides its arguments: ids, trace context, and streaming."""

    dispatch_id: str
    capability: str
    attempt: int
    deadline_ms: int
    task_id: str | None
    session_context: SessionContext | None
    send_chunk: Callable[[Any], object] = field(repr=False, default=lambda data: None)
    cancelled: bool = False
    _trace: SessionTraceContext | None = field(default=None, repr=False)

    @property
    def trace(self) -> SessionTraceContext:
        """`parent_trace_id`, `parent_span_id`, `baggage`: parsed on first use, then kept."""
        if self._trace is None:
            context = self.session_context
            self._trace = trace_context_from_headers(
                context.propagation_headers if context is not None else None
            )
        return self._trace

    def chunk(self, data: Any) -> None:
        """Stream one chunk to the caller (queued in the outbox while disconnected)."""
        self.send_chunk(data)


class CapabilityRegistry:
    """Capabilities by name, with their JSON Schemas compiled once."""

    def __init__(self) -> None:
        self.capabilities: dict[str, Capability] = {}

    def add(self, name: str, handler: Callable[..., Any], *, description: str = "",
            parameters: Mapping[str, Any] | None = None) -> Capability:
        validator = None
        if parameters is not None:
            import jsonschema  # a well-kept validator beats a hand-written one

            cls = jsonschema.validators.validator_for(parameters)
            cls.check_schema(parameters)
            validator = cls(parameters)
        capability = Capability(name, handler, description, parameters, validator)
        self.capabilities[name] = capability
        return capability

    def capability(self, name: str | None = None, *, description: str = "",
                   parameters: Mapping[str, Any] | None = None
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of `add()`."""

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name or handler.__name__, handler, description=description,
                     parameters=parameters)
            return handler

        return register

    def resolve(self, event: DispatchReceived) -> tuple[Capability | None, tuple[str, str] | None]:
        """The capability to run, or the (code, message) to answer with instead."""
        capability = self.capabilities.get(event.capability)
        if capability is None:
            return None, ("CAPABILITY_NOT_FOUND", f"no capability {event.capability!r} here")
        if capability.validator is not None:
            errors = sorted(capability.validator.iter_errors(dict(event.arguments)), key=str)
            if errors:
                first = errors[0]
                where = "/".join(str(p) for p in first.absolute_path) or "(root)"
                return None, ("INVALID_ARGUMENTS", f"{where}: {first.message}")
        return capability, None


def handler_outcome(exc: BaseException) -> tuple[str, str, dict[str, Any] | None]:
    """The terminal error for a handler that raised (spec 3: DISPATCH_FAILED)."""
    if isinstance(exc, HandlerError):
        return exc.code, exc.message, exc.detail
    return "DISPATCH_FAILED", f"{type(exc).__name__}: {exc}", None


def make_context(event: DispatchReceived, send_chunk: Callable[[Any], object]) -> DispatchContext:
    return DispatchContext(
        dispatch_id=event.dispatch_id,
        capability=event.capability,
        attempt=event.attempt,
        deadline_ms=event.deadline_ms,
        task_id=event.task_id,
        session_context=event.session_context,
        send_chunk=send_chunk,
    )


class Waiter(Protocol):
    """A one-shot result slot of the adapter's concurrency model."""

    def set_result(self, value: Any) -> None: ...
    def set_exception(self, exc: BaseException) -> None: ...


@dataclass(slots=True)
class _Pending:
    waiter: Waiter
    on_chunk: Callable[[Any], object] | None


class MeshWaiters:
    """Correlates mesh events with the callers waiting on their dispatches."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, dispatch_id: str, waiter: Waiter,
            on_chunk: Callable[[Any], object] | None = None) -> None:
        self._pending[dispatch_id] = _Pending(waiter, on_chunk)

    def discard(self, dispatch_id: str) -> None:
        self._pending.pop(dispatch_id, None)

    def dispatch_event(self, event: Event) -> bool:
        """Resolve a waiter from an event; False when the event is not a dispatch outcome."""
        kind = type(event)
        if kind is ChunkReceived:
            pending = self._pending.get(event.dispatch_id)  # type: ignore[attr-defined]
            if pending is not None and pending.on_chunk is not None:
                pending.on_chunk(event.data)  # type: ignore[attr-defined]
            return True
        if kind is DispatchCompleted:
            pending = self._pending.pop(event.dispatch_id, None)  # type: ignore[attr-defined]
            if pending is not None:
                pending.waiter.set_result(event.result)  # type: ignore[attr-defined]
            return True
        if kind is DispatchFailed or kind is DispatchTimedOut:
            dispatch_id: str = event.dispatch_id  # type: ignore[attr-defined]
            pending = self._pending.pop(dispatch_id, None)
            if pending is not None:
                if kind is DispatchTimedOut:
                    error = DispatchError(dispatch_id, "DEADLINE_EXCEEDED", "no answer in time")
                else:
                    error = DispatchError(dispatch_id, event.code, event.message, event.detail)  # type: ignore[attr-defined]
                pending.waiter.set_exception(error)
            return True
        return False

    def fail_all(self, code: str, message: str) -> None:
        for dispatch_id, pending in list(self._pending.items()):
            pending.waiter.set_exception(DispatchError(dispatch_id, code, message))
        self._pending.clear()


def client_ssl_context(ssl_context: ssl.SSLContext | None, cafile: str | None) -> ssl.SSLContext:
    """The TLS context for `wss://`: the caller's, or the system's plus a private CA file."""
    if ssl_context is not None:
        return ssl_context
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["http/1.1"])
    return context


AsyncHandler = Callable[[Mapping[str, Any], DispatchContext], Awaitable[Any]]
