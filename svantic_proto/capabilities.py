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

__all__ = [
    "Capability",
    "CapabilityRegistry",
    "DispatchContext",
    "argument_error",
    "compile_schema",
    "handler_outcome",
]

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
    """The compiled schema (jsonschema-rs), or None without `parameters`."""
    blocking: bool = False
    """A plain function that may block: the async drivers run it in a worker thread so it
    cannot stall their event loop (gevent runs every handler in a greenlet of its own)."""


def _no_chunks(data: Any) -> None:
    raise LocalProtocolError("this context is not attached to a running dispatch")


@dataclass(slots=True)
class DispatchContext:
    """What a handler gets besides its arguments: ids, trace context, streaming, cancellation.

    `cancelled` turns true when the mesh cancels the dispatch or its deadline passes, so
    a handler that polls (rather than being interrupted by its driver) can stop early;
    `on_cancel`, when set, is called then too (in the driver's thread), for a handler that
    waits for it. `portal` is set by a driver that runs the handler in a worker thread:
    `portal(function, *args)` runs `function` in the driver's own thread (awaiting what it
    returns, if awaitable) and returns its result, so `chunk` and `call_tool` work there.
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
    on_cancel: Callable[[], object] | None = field(default=None, repr=False)
    portal: Callable[..., Any] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Mark the dispatch cancelled and tell `on_cancel` (the runtime calls this)."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

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
        if self.portal is not None:
            self.portal(self.send_chunk, data)
        else:
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
        options = {"deadline_ms": deadline_ms, "agent_type": agent_type,
                   "instance_id": instance_id,
                   "session_id": context.session_id if context is not None else None}
        if self.portal is not None:  # from a worker thread: block for the result there
            return self.portal(self.tool_caller, tool, arguments, **options)
        return self.tool_caller(tool, arguments, **options)


class CapabilityRegistry:
    """Capabilities by name, with their JSON Schemas checked and compiled once, at definition."""

    def __init__(self) -> None:
        self.capabilities: dict[str, Capability] = {}

    def add(self, name: str, handler: Handler, *, description: str = "",
            parameters: Mapping[str, Any] | None = None,
            blocking: bool = False) -> Capability:
        """Define (or replace) a capability; a schema that is not valid raises here.

        `blocking=True` marks a plain function that may block (I/O, CPU): the async drivers
        run it in a worker thread (`Capability.blocking`)."""
        if not isinstance(name, str) or not name:
            raise LocalProtocolError(f"a capability needs a non-empty name, not {name!r}")
        if not callable(handler):
            raise LocalProtocolError(f"the handler of {name!r} is not callable")
        validator = None if parameters is None else compile_schema(name, parameters)
        capability = Capability(name, handler, description, parameters, validator, blocking)
        self.capabilities[name] = capability
        return capability

    def remove(self, name: str) -> bool:
        """Forget a capability; False when there was none by that name."""
        return self.capabilities.pop(name, None) is not None

    def capability(self, name: str | None = None, *, description: str = "",
                   parameters: Mapping[str, Any] | None = None, blocking: bool = False
                   ) -> Callable[[Handler], Handler]:
        """Decorator form of `add()`; the name defaults to the function's."""

        def register(handler: Handler) -> Handler:
            self.add(name or handler.__name__, handler, description=description,
                     parameters=parameters, blocking=blocking)
            return handler

        return register

    def resolve(self, event: DispatchReceived) -> tuple[Capability | None, tuple[str, str] | None]:
        """The capability to run, or the (code, message) to answer with instead."""
        capability = self.capabilities.get(event.capability)
        if capability is None:
            return None, ("CAPABILITY_NOT_FOUND", f"no capability {event.capability!r} here")
        validator = capability.validator
        if validator is not None:
            message = argument_error(validator, event.arguments)
            if message is not None:
                return None, ("INVALID_ARGUMENTS", message)
        return capability, None


def compile_schema(name: str, parameters: Mapping[str, Any]) -> Any:
    """The validator of one capability's JSON Schema, checked against its metaschema now.

    jsonschema-rs, chosen by measurement: ~0.2 us per valid call against ~30 us for
    jsonschema on a typical tool schema, and the draft is the schema's `$schema`, 2020-12
    without one. `offline`: a `$ref` to a remote document fails here instead of making the
    agent fetch a URL the schema names. Imported lazily: it loads `socket`, which gevent
    must patch first."""
    import jsonschema_rs  # noqa: PLC0415

    if not isinstance(parameters, Mapping):
        raise LocalProtocolError(f"the parameters of {name!r} must be a JSON Schema object")
    try:
        return jsonschema_rs.validator_for(dict(parameters), offline=True)
    except (ValueError, TypeError) as exc:  # jsonschema-rs' ValidationError is a ValueError
        reason = str(exc).split("\n", 1)[0]
        raise LocalProtocolError(
            f"the parameters of {name!r} are not a valid JSON Schema: {reason}") from None


def argument_error(validator: Any, arguments: Mapping[str, Any]) -> str | None:
    """None when `arguments` meet the schema, else `where: what` for the first failure.

    `is_valid` first: the common, valid case costs one native call, and the errors are
    collected (sorted by where, then what, so the answer is stable) only on a failure."""
    instance = dict(arguments)
    try:
        if validator.is_valid(instance):
            return None
        errors = sorted(((_where(e.instance_path), str(e.message))
                         for e in validator.iter_errors(instance)), key=lambda e: e)
    except (ValueError, TypeError, OverflowError):  # a value jsonschema-rs cannot read
        return "(root): the arguments cannot be checked against the schema"
    if not errors:
        return "(root): the arguments do not meet the schema"
    where, what = errors[0]
    return f"{where}: {what}"


def _where(path: Any) -> str:
    return "/".join(str(part) for part in path) or "(root)"


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
