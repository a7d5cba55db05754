"""Capabilities an agent offers, how their arguments are checked, and what a handler gets.

Sans-IO like the rest of the core: the agent runtime (`agent_runtime.py`) resolves each
dispatch against a `CapabilityRegistry` before any handler starts, so every driver refuses
an unknown capability or bad arguments the same way (spec 3: `CAPABILITY_NOT_FOUND`,
`INVALID_ARGUMENTS`) without running user code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import DispatchError, HandlerError, LocalProtocolError
from .events import DispatchReceived
from .frames import SessionContext
from .trace import SessionTraceContext, trace_context_from_headers

__all__ = ["Capability", "CapabilityRegistry", "DispatchContext", "handler_outcome"]

Handler = Callable[[Mapping[str, Any], "DispatchContext"], Any]
"""`handler(arguments, context)`: returns the result, or an awaitable of it (async drivers)."""


@dataclass(frozen=True, slots=True)
class Capability:
    """One named capability: its handler, and the JSON Schema its arguments must meet."""

    name: str
    handler: Handler
    description: str = ""
    parameters: Mapping[str, Any] | None = None
    """JSON Schema of the arguments; failures answer INVALID_ARGUMENTS (spec 3)."""
    validator: Any = None


def _no_chunks(data: Any) -> None:
    raise LocalProtocolError("this context is not attached to a running dispatch")


@dataclass(slots=True)
class DispatchContext:
    """What a handler gets besides its arguments: ids, trace context, streaming, cancellation.

    `cancelled` turns true when the mesh cancels the dispatch or its deadline passes, so
    a handler that polls (rather than being interrupted by its driver) can stop early.
    """

    dispatch_id: str
    capability: str
    attempt: int
    deadline_ms: int
    task_id: str | None
    session_context: SessionContext | None
    send_chunk: Callable[[Any], object] = field(repr=False, default=_no_chunks)
    cancelled: bool = False
    tool_caller: Callable[..., Any] | None = field(default=None, repr=False)
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

    def call_tool(self, tool: str, arguments: Mapping[str, Any] | None = None, *,
                  deadline_ms: int | None = None, agent_type: str | None = None,
                  instance_id: str | None = None) -> Any:
        """Run another agent's capability through the mesh (spec 3 `tool_call`) and get its
        result: awaitable on the async adapters, blocking on gevent. Raises `DispatchError`
        with the mesh's code (`AGENT_UNAVAILABLE`, `TOOL_DEPTH_EXCEEDED`, the agent's own).

        The call carries this dispatch's session id, so the mesh can bound a chain of
        calls (an agent calling itself without end stops at the mesh's depth limit)."""
        if self.tool_caller is None:
            raise LocalProtocolError("tool calls need an agent driver (an adapter's Agent)")
        context = self.session_context
        return self.tool_caller(
            tool, arguments, deadline_ms=deadline_ms, agent_type=agent_type,
            instance_id=instance_id,
            session_id=context.session_id if context is not None else None)


class CapabilityRegistry:
    """Capabilities by name, with their JSON Schemas checked and compiled once, at definition."""

    def __init__(self) -> None:
        self.capabilities: dict[str, Capability] = {}

    def add(self, name: str, handler: Handler, *, description: str = "",
            parameters: Mapping[str, Any] | None = None) -> Capability:
        """Define (or replace) a capability; a schema that is not valid raises here."""
        if not isinstance(name, str) or not name:
            raise LocalProtocolError(f"a capability needs a non-empty name, not {name!r}")
        if not callable(handler):
            raise LocalProtocolError(f"the handler of {name!r} is not callable")
        validator = None
        if parameters is not None:
            import jsonschema  # noqa: PLC0415  # lazily: it is slow to import and loads threading

            cls = jsonschema.validators.validator_for(parameters)
            try:
                cls.check_schema(parameters)
            except jsonschema.SchemaError as exc:
                raise LocalProtocolError(
                    f"the parameters of {name!r} are not a valid JSON Schema: {exc.message}"
                ) from None
            validator = cls(parameters)
        capability = Capability(name, handler, description, parameters, validator)
        self.capabilities[name] = capability
        return capability

    def capability(self, name: str | None = None, *, description: str = "",
                   parameters: Mapping[str, Any] | None = None
                   ) -> Callable[[Handler], Handler]:
        """Decorator form of `add()`; the name defaults to the function's."""

        def register(handler: Handler) -> Handler:
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
    """The terminal error for a handler that raised (spec 3: DISPATCH_FAILED).

    A `HandlerError` chooses its own code. A `DispatchError` the handler let through (a
    tool call that failed) keeps its code and message, which the mesh wrote, so a chain of
    calls reports the failure at its root (`TOOL_DEPTH_EXCEEDED`, say). Any other exception
    is DISPATCH_FAILED naming only its type: its text may hold internal detail, and stays
    in the agent's log with the traceback.
    """
    if isinstance(exc, HandlerError):
        return exc.code, exc.message, exc.detail
    if isinstance(exc, DispatchError):
        return exc.code, exc.message or exc.code, None
    return "DISPATCH_FAILED", f"the handler raised {type(exc).__name__}", None
