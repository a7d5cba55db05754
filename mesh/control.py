"""The control plane of spec 6: the answer to every HTTPS path, without doing any I/O.

`ControlPlane.handle` turns one complete `HttpRequest` into either a finished `Response` or
an *effect* the serving code must carry out because it needs the network or time:

* `Dispatch` — send a routed dispatch (over the agent's socket or to its hosted url), then
  call `dispatch_finished` (and, when streaming, `sse_chunk` / `sse_result`);
* `ProbeCard` — GET a hosted agent's card, then call `probe_finished`;
* `Subscribe` — open the tenant's `/events` stream on the `EventBus`.

Keeping the decisions pure means every status code, validation message and tenant check is
tested without sockets or clocks: `now` (monotonic) and `wall` (epoch seconds) come in as
arguments. Nothing a client sees is built from exception text: validation failures name the
field, and anything unexpected is logged here and answered with a fixed 500 body.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, Protocol
from urllib.parse import urlencode, urlsplit

import msgspec

from svantic_proto.http import HttpRequest

from .events import EventBus, sse
from .metrics import MeshMetrics
from .model import (
    CONNECTION_STATUSES,
    POLICY_MODES,
    ROUTING_STATUSES,
    InstanceRow,
    Lease,
    RouteError,
)
from .registry import InstanceConflict, Registry, RegistryError
from .tokens import InvalidToken, TokenIssuer

__all__ = [
    "DASHBOARD_CSP",
    "ControlPlane",
    "Dispatch",
    "FleetLike",
    "ProbeCard",
    "Response",
    "Subscribe",
    "error_response",
    "sse_chunk",
    "sse_result",
]

_log = logging.getLogger("svantic.mesh.control")

DASHBOARD_CSP: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'"
)
"""The dashboard is one self-contained page that only talks back to this origin."""

_JSON: Final = ("content-type", "application/json")
_NO_STORE: Final = ("cache-control", "no-store")
_NOSNIFF: Final = ("x-content-type-options", "nosniff")
_BEARER_CHALLENGE: Final = (("www-authenticate", "Bearer"),)
_BAD_TOKEN_CHALLENGE: Final = (("www-authenticate", 'Bearer error="invalid_token"'),)

_MAX_AGENT_TYPE: Final = 128
_MAX_INSTANCE_ID: Final = 256
_MAX_SECRET: Final = 4096
_MAX_URL: Final = 2048
_MAX_SHORT: Final = 256
_MAX_CAPABILITY: Final = 256
_MAX_COUNT: Final = 2**31 - 1
_MAX_LIST_LIMIT: Final = 500
_DEFAULT_LIST_LIMIT: Final = 100
_STATS_PAGE: Final = 500
_MAX_AGENT_MESSAGE: Final = 2048
_MAX_PROBE_REASON: Final = 200
_RECORDS_WARNING_EVERY: Final = 10.0
"""Seconds between two WARNING lines for a records outage: one line says it started, the
requests failing meanwhile are counted at DEBUG, not one line each."""
_CODE_RE: Final = re.compile(r"[A-Z][A-Z0-9_]{0,63}")

_ROUTE_FAILURE_STATUS: Final[Mapping[str, int]] = {
    "AGENT_UNAVAILABLE": 503,
    "AGENT_DISCONNECTED": 502,
    "AGENT_UNHEALTHY": 502,
    "DEADLINE_EXCEEDED": 504,
}
"""Failures that are the mesh's (spec 6); any other code is the agent's own, answered 422."""

_DEPLOYMENT_MODES: Final = ("connected", "hosted")
_DISPATCH_AUTH_TYPES: Final = ("svantic_jwt", "shared_secret", "mtls")
_HEARTBEAT_STATUSES: Final = ("available", "busy", "offline")
_TRANSPORTS: Final = ("ws", "callback")


class FleetLike(Protocol):
    """What the control plane needs of `svantic_mesh.fleet.Fleet`, which keeps the router,
    the registry and the events consistent."""

    def registered(
        self,
        row: InstanceRow,
        *,
        secret: str | None,
        created: bool,
        flagged: bool,
        now: float,
        wall: float,
    ) -> Any: ...

    def deregister(self, instance_id: str, *, reason: str, now: float, wall: float) -> bool: ...

    def heartbeat(
        self,
        instance_id: str,
        *,
        status: str | None,
        active_sessions: int,
        max_concurrent_sessions: int | None,
        load: float | None,
        now: float,
        wall: float,
    ) -> str: ...

    def acquire(
        self,
        tenant_id: str,
        capability: str,
        *,
        agent_type: str | None = None,
        instance_id: str | None = None,
        now: float,
    ) -> Lease: ...

    def finished(
        self,
        lease: Lease,
        *,
        code: str | None,
        message: str | None,
        transport: str,
        seconds: float,
        now: float,
        wall: float,
    ) -> Any: ...

    def status(self, instance_id: str) -> dict[str, Any] | None: ...


# -- answers and effects ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """A complete HTTP answer. Every one carries `cache-control: no-store`: control plane
    answers hold tokens and live state that no cache may keep or replay."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @classmethod
    def json(
        cls, status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        return cls(status, (_JSON, _NO_STORE, _NOSNIFF, *headers), msgspec.json.encode(obj))

    @classmethod
    def raw(
        cls, status: int, content_type: str, body: bytes,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Response:
        return cls(status, (("content-type", content_type), _NO_STORE, _NOSNIFF, *headers), body)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def error_response(
    status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    """The spec 1 error body, `{"error": {"code", "message"}}`."""
    return Response.json(status, {"error": {"code": code, "message": message}}, headers)


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Effect: send this routed dispatch, then call `ControlPlane.dispatch_finished` exactly
    once so the lease goes back to the router.

    `url` is the hosted agent's base url (None over the socket); `started` is the `now` the
    dispatch was routed at, for the latency the serving code reports.
    """

    lease: Lease
    capability: str
    arguments: dict[str, Any]
    deadline_ms: int
    session_context: dict[str, Any] | None
    stream: bool
    transport: Literal["ws", "callback"]
    url: str | None
    started: float


@dataclass(frozen=True, slots=True)
class ProbeCard:
    """Effect: GET `card_url` (a hosted agent's card), then call
    `ControlPlane.probe_finished` with the parsed body or a short reason.

    The rest is the validated registration waiting on the probe. The secret is kept out of
    `repr` so a logged effect never shows it.
    """

    url: str
    card_url: str
    tenant_id: str
    row: InstanceRow = field(compare=False)
    secret: str | None = field(repr=False, compare=False)
    flagged: bool
    admit_type: bool
    card_given: bool


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Effect: stream `tenant_id`'s lifecycle events (`EventBus.subscribe`) as SSE."""

    tenant_id: str


Effect = Response | Dispatch | ProbeCard | Subscribe


def sse_chunk(data: Any, seq: int) -> bytes:
    """One streamed `chunk` event of a dispatch: `{seq, data}`."""
    return sse("chunk", {"seq": seq, "data": data})


def sse_result(
    dispatch: Dispatch,
    *,
    dispatch_id: str | None,
    result: Any = None,
    code: str | None = None,
    message: str | None = None,
) -> bytes:
    """The final event of a streamed dispatch: `result` with `{dispatch_id, instance_id,
    result}`, or `error` with the spec 1 error body (codes mapped as `dispatch_finished`
    maps them)."""
    if code is None:
        body = {
            "dispatch_id": dispatch_id,
            "instance_id": dispatch.lease.instance_id,
            "result": result,
        }
        try:
            return sse("result", body)
        except (ValueError, TypeError):
            # NaN/infinity or a non-JSON value: the agent's answer cannot be carried.
            code, message = "DISPATCH_FAILED", "the agent's result is not valid JSON"
    _, safe_code, safe_message = _failure(code, message)
    return sse("error", {"error": {"code": safe_code, "message": safe_message}})


def _failure(code: str, message: str | None) -> tuple[int, str, str]:
    """Status, code and message for a failed dispatch. The agent's own code passes through
    when it looks like a code; its message is bounded, never exception text of ours."""
    status = _ROUTE_FAILURE_STATUS.get(code)
    if status is not None:
        return status, code, _bounded(message) or code.lower().replace("_", " ")
    if not isinstance(code, str) or not _CODE_RE.fullmatch(code):
        code = "DISPATCH_FAILED"
    return 422, code, _bounded(message) or "the dispatch failed"


def _bounded(message: Any) -> str:
    if not isinstance(message, str):
        return ""
    return message[:_MAX_AGENT_MESSAGE]


# -- body validation ------------------------------------------------------------------------


class _Invalid(Exception):
    """A request the client must fix; `message` names the field and is ours to show."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Fail(Exception):
    """A finished error answer raised from deep in a handler."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _opt(body: Mapping[str, Any], name: str) -> Any:
    # JSON null means "not given" for every optional field (seed 004: url "omitted or null").
    return body.get(name)


def _str(
    body: Mapping[str, Any],
    name: str,
    *,
    required: bool = False,
    max_len: int = _MAX_SHORT,
    label: str | None = None,
) -> str | None:
    label = label or name
    value = _opt(body, name)
    if value is None:
        if required:
            raise _Invalid(f"{label} is required")
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{label} must be a string")
    if not 1 <= len(value) <= max_len:
        raise _Invalid(f"{label} must be 1 to {max_len} characters")
    return value


def _req_str(body: Mapping[str, Any], name: str, *, max_len: int = _MAX_SHORT) -> str:
    value = _str(body, name, required=True, max_len=max_len)
    assert value is not None
    return value


def _printable(value: str, label: str, *, spaces: bool) -> str:
    if not value.isprintable() or (not spaces and any(c.isspace() for c in value)):
        text = "printable" if spaces else "printable without whitespace"
        raise _Invalid(f"{label} must be {text}")
    return value


def _int(
    body: Mapping[str, Any],
    name: str,
    *,
    lo: int,
    hi: int,
    required: bool = False,
) -> int | None:
    value = _opt(body, name)
    if value is None:
        if required:
            raise _Invalid(f"{name} is required")
        return None
    # Strict: bool is an int subclass and 1.0 is not an integer on this wire.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise _Invalid(f"{name} must be between {lo} and {hi}")
    return value


def _obj(body: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = _opt(body, name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Invalid(f"{name} must be an object")
    return value


def _enum(
    body: Mapping[str, Any],
    name: str,
    allowed: tuple[str, ...],
    *,
    required: bool = False,
    label: str | None = None,
) -> str | None:
    label = label or name
    value = _opt(body, name)
    if value is None:
        if required:
            raise _Invalid(f"{label} is required")
        return None
    if not isinstance(value, str) or value not in allowed:
        raise _Invalid(f"{label} must be one of {', '.join(allowed)}")
    return value


def _instance_id(body: Mapping[str, Any]) -> str:
    value = _req_str(body, "instance_id", max_len=_MAX_INSTANCE_ID)
    return _printable(value, "instance_id", spaces=False)


def _agent_type(body: Mapping[str, Any], *, required: bool) -> str | None:
    value = _str(body, "agent_type", required=required, max_len=_MAX_AGENT_TYPE)
    return None if value is None else _printable(value, "agent_type", spaces=True)


def _hosted_url(value: Any) -> str:
    """A hosted agent's base url: https only (seed 004), a host, no credentials, query or
    fragment (the card and /send paths are appended to it)."""
    if not isinstance(value, str):
        raise _Invalid("url must be a string")
    if not 1 <= len(value) <= _MAX_URL:
        raise _Invalid(f"url must be 1 to {_MAX_URL} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise _Invalid("url must not contain whitespace or control characters")
    lowered = value.lower()
    if lowered.startswith("http://"):
        raise _Invalid("http urls are refused: url must be https://")
    if not lowered.startswith("https://"):
        raise _Invalid("url must be an https:// url")
    try:
        parts = urlsplit(value)
        host = parts.hostname
        _ = parts.port
    except ValueError:
        raise _Invalid("url is not a valid url") from None
    if not host:
        raise _Invalid("url must name a host")
    if parts.username is not None or parts.password is not None:
        raise _Invalid("url must not carry credentials")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise _Invalid("url must not have a query or fragment")
    return value.rstrip("/")


def _encode_cursor(instance_id: str) -> str:
    return base64.urlsafe_b64encode(instance_id.encode("utf-8")).decode("ascii").rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        decoded = base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        raise _Invalid("cursor is not a cursor this mesh returned") from None
    if not decoded:
        raise _Invalid("cursor is not a cursor this mesh returned")
    return decoded


# -- the control plane ----------------------------------------------------------------------


_Handler = Callable[[str, dict[str, Any], HttpRequest, float, float], Effect]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    name: str
    auth: bool
    json_body: bool


_ROUTES: Final[Mapping[str, _Route]] = {
    "/auth/token": _Route("POST", "auth_token", auth=False, json_body=True),
    "/agents/register": _Route("POST", "register", auth=True, json_body=True),
    "/agents/deregister": _Route("POST", "deregister", auth=True, json_body=True),
    "/agents/heartbeat": _Route("POST", "heartbeat", auth=True, json_body=True),
    "/agents/get_connection": _Route("POST", "get_connection", auth=True, json_body=True),
    "/agents/get_connection_stats": _Route(
        "POST", "get_connection_stats", auth=True, json_body=True
    ),
    "/agents/list_connections": _Route("POST", "list_connections", auth=True, json_body=True),
    "/agents/allow_type": _Route("POST", "allow_type", auth=True, json_body=True),
    "/agents/set_policy": _Route("POST", "set_policy", auth=True, json_body=True),
    "/sessions/init": _Route("POST", "session_init", auth=True, json_body=True),
    "/sessions/close": _Route("POST", "session_close", auth=True, json_body=True),
    "/agents/dispatch": _Route("POST", "dispatch", auth=True, json_body=True),
    "/events": _Route("GET", "events", auth=True, json_body=False),
    "/metrics": _Route("GET", "metrics", auth=True, json_body=False),
    "/.well-known/jwks.json": _Route("GET", "jwks", auth=False, json_body=False),
    "/dashboard": _Route("GET", "dashboard", auth=False, json_body=False),
    "/healthz": _Route("GET", "healthz", auth=False, json_body=False),
}


class ControlPlane:
    """Answers spec 6's HTTPS paths for one mesh. Stateless between calls: everything
    durable is in the registry, everything live in the fleet."""

    def __init__(
        self,
        *,
        registry: Registry,
        fleet: FleetLike,
        tokens: TokenIssuer,
        events: EventBus,
        metrics: MeshMetrics,
        public_url: str,
        connect_path: str = "/agents/connect",
        dispatch_auth_enabled: bool = True,
        jwks: Mapping[str, Any] | None = None,
        max_body_bytes: int = 1 << 20,
        default_deadline_ms: int = 30_000,
        max_deadline_ms: int = 300_000,
        new_id: Callable[[], str],
        dashboard_html: bytes | None = None,
    ) -> None:
        parts = urlsplit(public_url)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise ValueError("public_url must be an absolute https:// url")
        if not connect_path.startswith("/"):
            raise ValueError("connect_path must start with '/'")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if not 1 <= default_deadline_ms <= max_deadline_ms:
            raise ValueError("default_deadline_ms must be between 1 and max_deadline_ms")
        self._registry = registry
        self._fleet = fleet
        self._tokens = tokens
        self._events = events
        self._metrics = metrics
        base_path = parts.path.rstrip("/")
        self._public_url = f"{parts.scheme}://{parts.netloc}{base_path}"
        ws_scheme = "wss" if parts.scheme == "https" else "ws"
        self._connect_base = f"{ws_scheme}://{parts.netloc}{base_path}{connect_path}"
        self._jwks_url = f"{self._public_url}/.well-known/jwks.json"
        self._dispatch_auth_enabled = dispatch_auth_enabled
        keys = list(jwks.get("keys", ())) if jwks is not None else []
        self._jwks_body = msgspec.json.encode({"keys": keys})
        self._max_body = max_body_bytes
        self._default_deadline = default_deadline_ms
        self._max_deadline = max_deadline_ms
        self._new_id = new_id
        self._dashboard = dashboard_html
        self._records_warned_at: float | None = None
        self._handlers: dict[str, _Handler] = {
            route.name: getattr(self, f"_h_{route.name}") for route in _ROUTES.values()
        }
        # The fleet's live view of who owns an instance, when it has one (`Fleet.tenant_of`):
        # the ownership checks on the hot paths read memory, not the registry.
        self._tenant_of: Callable[[str], str | None] | None = getattr(fleet, "tenant_of", None)

    @property
    def dispatch_auth_enabled(self) -> bool:
        return self._dispatch_auth_enabled

    # -- entry point ------------------------------------------------------------------

    def handle(self, request: HttpRequest, *, now: float, wall: float) -> Effect:
        """The answer (or effect) for one request. Never raises: the records unreachable is
        answered 503 UNAVAILABLE with `Retry-After`, any other unexpected failure is logged
        with its traceback and answered 500 INTERNAL, each with a fixed message."""
        try:
            return self._handle(request, now, wall)
        except _Fail as fail:
            return fail.response
        except RegistryError as exc:
            # The records (the registry's database) are away: an outage the mesh recovers
            # from by itself once the database answers, so the caller is told to retry,
            # in our own words (the database's text stays in the log).
            self._records_unavailable(request, exc, now)
            return error_response(503, "UNAVAILABLE", "the mesh's records are unavailable: "
                                  "try again", (("retry-after", "1"),))
        except Exception:
            _log.exception("control plane failure on %s %s", request.method, request.path)
            return error_response(500, "INTERNAL", "internal error")

    def _records_unavailable(self, request: HttpRequest, exc: RegistryError, now: float) -> None:
        """One WARNING line per outage (at most one per `_RECORDS_WARNING_EVERY` seconds), no
        traceback: the failure is the database's, not a bug here."""
        text = str(exc).split("\n", 1)[0][:200]
        last = self._records_warned_at
        if last is None or now - last >= _RECORDS_WARNING_EVERY or now < last:
            self._records_warned_at = now
            _log.warning("records unavailable: %s %s answered 503 (%s: %s)", request.method,
                         request.path, type(exc).__name__, text)
        else:
            _log.debug("records unavailable: %s %s answered 503", request.method, request.path)

    def _handle(self, request: HttpRequest, now: float, wall: float) -> Effect:
        route = _ROUTES.get(request.path)
        if route is None:
            return error_response(404, "NOT_FOUND", "no such path")
        method = request.method.upper()
        if method != route.method:
            return error_response(
                405,
                "METHOD_NOT_ALLOWED",
                f"{request.path} accepts {route.method} only",
                (("allow", route.method),),
            )
        if len(request.body) > self._max_body:
            return error_response(
                413, "PAYLOAD_TOO_LARGE", f"the body exceeds {self._max_body} bytes"
            )
        tenant = ""
        if route.auth:
            tenant = self._authenticate(request, wall)
        body: dict[str, Any] = {}
        if route.json_body:
            body = self._parse_body(request.body)
        try:
            return self._handlers[route.name](tenant, body, request, now, wall)
        except _Invalid as bad:
            return error_response(400, "INVALID_REQUEST", bad.message)

    def _authenticate(self, request: HttpRequest, wall: float) -> str:
        """The tenant of the request's bearer token; cookies are never read (spec 1)."""
        header = request.header("authorization")
        if header is None:
            raise _Fail(
                error_response(401, "UNAUTHORIZED", "a bearer token is required",
                               _BEARER_CHALLENGE)
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _Fail(
                error_response(401, "UNAUTHORIZED", "the authorization header must be "
                               "'Bearer <token>'", _BEARER_CHALLENGE)
            )
        try:
            claims = self._tokens.verify(token, wall)
        except InvalidToken:
            raise _Fail(
                error_response(401, "UNAUTHORIZED", "the token is invalid or expired",
                               _BAD_TOKEN_CHALLENGE)
            ) from None
        return str(claims["tenant_id"])

    @staticmethod
    def _parse_body(raw: bytes) -> dict[str, Any]:
        if not raw.strip():
            raise _Fail(error_response(400, "INVALID_REQUEST", "a JSON object body is required"))
        try:
            body = msgspec.json.decode(raw)
        except (msgspec.DecodeError, ValueError, RecursionError):
            raise _Fail(
                error_response(400, "INVALID_REQUEST", "the body is not valid JSON")
            ) from None
        if not isinstance(body, dict):
            raise _Fail(error_response(400, "INVALID_REQUEST", "the body must be a JSON object"))
        return body

    def _own_instance(self, tenant: str, instance_id: str) -> InstanceRow:
        """The tenant's instance; another tenant's is answered exactly like a missing one so
        ids of other tenants are never confirmed."""
        row = self._registry.get_instance(instance_id)
        if row is None or row.tenant_id != tenant:
            raise _Fail(error_response(404, "INSTANCE_NOT_FOUND", "no such instance"))
        return row

    def _check_own(self, tenant: str, instance_id: str) -> None:
        """`_own_instance` where the row itself is not needed: the fleet's live state
        answers for an instance it holds (it holds every registered one, written with the
        record), the registry for any other."""
        tenant_of = self._tenant_of
        owner = tenant_of(instance_id) if tenant_of is not None else None
        if owner is None:
            self._own_instance(tenant, instance_id)
        elif owner != tenant:
            raise _Fail(error_response(404, "INSTANCE_NOT_FOUND", "no such instance"))

    # -- /auth/token ------------------------------------------------------------------

    def _h_auth_token(
        self, _t: str, body: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        client_id = _req_str(body, "client_id")
        client_secret = _req_str(body, "client_secret", max_len=_MAX_SECRET)
        tenant = self._registry.verify_client(client_id, client_secret)
        if tenant is None:
            return error_response(
                401, "UNAUTHORIZED", "invalid client credentials", _BEARER_CHALLENGE
            )
        token, expires_in = self._tokens.issue(client_id, tenant, wall)
        return Response.json(
            200,
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": expires_in,
                "tenant_id": tenant,
            },
            (("pragma", "no-cache"),),
        )

    # -- /agents/register -------------------------------------------------------------

    def _h_register(
        self, tenant: str, body: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        agent_type = _agent_type(body, required=True)
        assert agent_type is not None
        instance_id = _instance_id(body)
        raw_url = _opt(body, "url")
        url = None if raw_url is None else _hosted_url(raw_url)
        explicit = _enum(body, "deployment_mode", _DEPLOYMENT_MODES)
        mode = explicit or ("hosted" if url is not None else "connected")
        if mode == "hosted" and url is None:
            raise _Invalid("url is required when deployment_mode is hosted")
        if mode == "connected" and url is not None:
            raise _Invalid("url must be omitted when deployment_mode is connected")

        auth = _obj(body, "dispatch_auth") or {}
        auth_type = _enum(
            auth, "type", _DISPATCH_AUTH_TYPES, label="dispatch_auth.type"
        ) or "svantic_jwt"
        if auth_type == "mtls":
            raise _Invalid("dispatch_auth.type mtls is reserved and not accepted")
        credentials_ref = _str(auth, "credentials_ref", label="dispatch_auth.credentials_ref")
        secret_value = _opt(body, "secret")
        secret: str | None = None
        if auth_type == "shared_secret":
            secret = _str(body, "secret", required=True, max_len=_MAX_SECRET)
        elif secret_value is not None:
            raise _Invalid("secret is accepted only with dispatch_auth.type shared_secret")

        agent_card = _obj(body, "agent_card")
        tools_value = _opt(body, "tools")
        tools: list[dict[str, Any]] = []
        if tools_value is not None:
            if not isinstance(tools_value, list) or not all(
                isinstance(t, dict) for t in tools_value
            ):
                raise _Invalid("tools must be a list of objects")
            tools = tools_value
        mcp_servers = _obj(body, "mcp_servers")
        max_sessions = _int(body, "max_concurrent_sessions", lo=0, hi=_MAX_COUNT) or 0

        existing = self._check_upsert(tenant, instance_id, mode)
        policy = self._registry.policy_mode(tenant)
        allowed = agent_type in self._registry.allowed_types(tenant)
        if policy == "allow-list" and not allowed:
            _log.info("registration refused by allow-list (tenant=%s, agent_type=%s)",
                      tenant, agent_type)
            return error_response(
                403, "AGENT_TYPE_NOT_ALLOWED",
                f"agent type {agent_type!r} is not on the tenant's allow-list",
            )
        flagged = policy == "audit" and not allowed
        admit_type = policy == "open" and not allowed

        row = InstanceRow(
            instance_id=instance_id,
            tenant_id=tenant,
            agent_type=agent_type,
            deployment_mode=mode,
            url=url,
            dispatch_auth_type=auth_type,
            credentials_ref=credentials_ref,
            agent_card=agent_card,
            tools=tools,
            mcp_servers=mcp_servers,
            max_concurrent_sessions=max_sessions,
            registered_at=wall,
            has_secret=secret is not None,
        )
        if url is not None:
            return ProbeCard(
                url=url,
                card_url=f"{url}/.well-known/agent-card.json",
                tenant_id=tenant,
                row=row,
                secret=secret,
                flagged=flagged,
                admit_type=admit_type,
                card_given=agent_card is not None,
            )
        return self._admit(row, secret, created=existing is None, flagged=flagged,
                           admit_type=admit_type, now=now, wall=wall)

    def _check_upsert(self, tenant: str, instance_id: str, mode: str) -> InstanceRow | None:
        """The existing row an upsert replaces; refuses another tenant's id (403) and a
        deployment-mode switch (409, seed 004)."""
        existing = self._registry.get_instance(instance_id)
        if existing is None:
            return None
        if existing.tenant_id != tenant:
            raise _Fail(error_response(
                403, "TENANT_MISMATCH", "the instance id is registered by another tenant"
            ))
        if existing.deployment_mode != mode:
            raise _Fail(error_response(
                409, "DEPLOYMENT_MODE_MISMATCH",
                f"the instance is registered as {existing.deployment_mode}; deregister it "
                "first or use a new instance id",
            ))
        return existing

    def probe_finished(
        self,
        probe: ProbeCard,
        *,
        card: Any | None,
        error: str | None,
        now: float,
        wall: float,
    ) -> Response:
        """Finish a hosted registration after the card probe: 502 when the probe failed or
        the card is not a JSON object, else admit the instance (the probed card is stored
        when the registration carried none)."""
        try:
            if error is not None or not isinstance(card, dict):
                reason = _probe_reason(error) if error is not None else (
                    "the agent card is not a JSON object"
                )
                _log.info("hosted registration refused: card probe failed (tenant=%s, "
                          "instance_id=%s)", probe.tenant_id, probe.row.instance_id)
                return error_response(
                    502, "AGENT_CARD_PROBE_FAILED", f"the agent card probe failed: {reason}"
                )
            # The probe took time: look again at what the upsert replaces.
            existing = self._check_upsert(
                probe.tenant_id, probe.row.instance_id, probe.row.deployment_mode
            )
            row = probe.row
            if not probe.card_given:
                row = _replace_card(row, card)
            return self._admit(row, probe.secret, created=existing is None,
                               flagged=probe.flagged, admit_type=probe.admit_type,
                               now=now, wall=wall)
        except _Fail as fail:
            return fail.response
        except Exception:
            _log.exception("control plane failure finishing a hosted registration")
            return error_response(500, "INTERNAL", "internal error")

    def _admit(
        self,
        row: InstanceRow,
        secret: str | None,
        *,
        created: bool,
        flagged: bool,
        admit_type: bool,
        now: float,
        wall: float,
    ) -> Response:
        try:
            self._fleet.registered(row, secret=secret, created=created, flagged=flagged,
                                   now=now, wall=wall)
        except InstanceConflict:
            # Another tenant took the id between our check and the write.
            return error_response(
                403, "TENANT_MISMATCH", "the instance id is registered by another tenant"
            )
        if admit_type:
            # Open mode (seed 004): the type joins the tenant's allow-list automatically.
            self._registry.allow_type(row.tenant_id, row.agent_type)
        _log.info(
            "instance %s (tenant=%s, agent_type=%s, mode=%s, auth=%s)%s",
            "registered" if created else "re-registered",
            row.tenant_id, row.agent_type, row.deployment_mode, row.dispatch_auth_type,
            " flagged for audit" if flagged else "",
        )
        dispatch_auth: dict[str, Any] = {"type": row.dispatch_auth_type}
        if row.credentials_ref is not None:
            dispatch_auth["credentials_ref"] = row.credentials_ref
        jwks_url = (
            self._jwks_url
            if row.dispatch_auth_type == "svantic_jwt" and self._dispatch_auth_enabled
            else None
        )
        connect_url = (
            f"{self._connect_base}?{urlencode({'instance_id': row.instance_id})}"
            if row.deployment_mode == "connected"
            else None
        )
        return Response.json(200, {
            "ok": True,
            "tenant_id": row.tenant_id,
            "instance_id": row.instance_id,
            "deployment_mode": row.deployment_mode,
            "connect_url": connect_url,
            "svantic_jwks_url": jwks_url,
            "dispatch_auth": dispatch_auth,
        })

    # -- instances --------------------------------------------------------------------

    def _h_deregister(
        self, tenant: str, body: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        instance_id = _instance_id(body)
        row = self._own_instance(tenant, instance_id)
        if not self._fleet.deregister(instance_id, reason="deregistered", now=now, wall=wall):
            return error_response(404, "INSTANCE_NOT_FOUND", "no such instance")
        _log.info("instance deregistered (tenant=%s, agent_type=%s)", tenant, row.agent_type)
        return Response.json(200, {"ok": True})

    def _h_heartbeat(
        self, tenant: str, body: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        instance_id = _instance_id(body)
        status = _enum(body, "status", _HEARTBEAT_STATUSES)
        active = _int(body, "active_sessions", lo=0, hi=_MAX_COUNT, required=True)
        assert active is not None
        max_sessions = _int(body, "max_concurrent_sessions", lo=0, hi=_MAX_COUNT)
        _int(body, "in_flight", lo=0, hi=_MAX_COUNT)
        load_value = _opt(body, "load")
        load: float | None = None
        if load_value is not None:
            if (
                not isinstance(load_value, int | float)
                or isinstance(load_value, bool)
                or not math.isfinite(load_value)
                or not 0 <= load_value <= 1
            ):
                raise _Invalid("load must be a number between 0 and 1")
            load = float(load_value)
        _obj(body, "health")
        self._check_own(tenant, instance_id)
        try:
            routing_status = self._fleet.heartbeat(
                instance_id,
                status=status,
                active_sessions=active,
                max_concurrent_sessions=max_sessions,
                load=load,
                now=now,
                wall=wall,
            )
        except RouteError as err:
            return error_response(err.status, err.code, err.message)
        return Response.json(200, {"ok": True, "routing_status": routing_status})

    def _h_get_connection(
        self, tenant: str, body: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        instance_id = _instance_id(body)
        self._own_instance(tenant, instance_id)
        status = self._fleet.status(instance_id)
        if status is None:
            return error_response(404, "INSTANCE_NOT_FOUND", "no such instance")
        return Response.json(200, status)

    def _h_get_connection_stats(
        self, tenant: str, body: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        agent_type = _agent_type(body, required=False)
        by_mode = dict.fromkeys(_DEPLOYMENT_MODES, 0)
        by_connection = dict.fromkeys(CONNECTION_STATUSES, 0)
        by_transport = dict.fromkeys(_TRANSPORTS, 0)
        total = 0
        after: str | None = None
        while True:
            page = self._registry.list_instances(
                tenant, agent_type=agent_type, limit=_STATS_PAGE, after=after
            )
            for row in page:
                status = self._fleet.status(row.instance_id)
                if status is None:  # removed while we paged
                    continue
                total += 1
                _count(by_mode, status.get("deployment_mode"))
                _count(by_connection, status.get("connection_status"))
                _count(by_transport, status.get("transport"))
            if len(page) < _STATS_PAGE:
                break
            after = page[-1].instance_id
        return Response.json(200, {
            "total": total,
            "by_deployment_mode": by_mode,
            "by_connection_status": by_connection,
            "by_transport": by_transport,
        })

    def _h_list_connections(
        self, tenant: str, body: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        """Extension: one page of the tenant's instances as `/agents/get_connection`
        shapes. `status` matches either status (`unknown` and `offline` are both)."""
        agent_type = _agent_type(body, required=False)
        statuses = tuple(dict.fromkeys((*ROUTING_STATUSES, *CONNECTION_STATUSES)))
        wanted = _enum(body, "status", statuses)
        limit = _int(body, "limit", lo=1, hi=_MAX_LIST_LIMIT) or _DEFAULT_LIST_LIMIT
        cursor = _str(body, "cursor", max_len=2 * _MAX_INSTANCE_ID)
        after = None if cursor is None else _decode_cursor(cursor)
        items: list[dict[str, Any]] = []
        last_id: str | None = None
        more = False
        while not more:
            page = self._registry.list_instances(
                tenant, agent_type=agent_type, limit=_MAX_LIST_LIMIT, after=after
            )
            for row in page:
                status = self._fleet.status(row.instance_id)
                if status is None:
                    continue
                if wanted is not None and wanted not in (
                    status.get("routing_status"), status.get("connection_status")
                ):
                    continue
                if len(items) == limit:
                    more = True  # one more match exists: the page is not the last
                    break
                items.append(status)
                last_id = row.instance_id
            if len(page) < _MAX_LIST_LIMIT:
                break
            after = page[-1].instance_id
        next_cursor = _encode_cursor(last_id) if more and last_id is not None else None
        return Response.json(200, {"items": items, "next_cursor": next_cursor})

    # -- policy -----------------------------------------------------------------------

    def _h_allow_type(
        self, tenant: str, body: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        agent_type = _agent_type(body, required=True)
        assert agent_type is not None
        self._registry.allow_type(tenant, agent_type)
        _log.info("agent type allowed (tenant=%s, agent_type=%s)", tenant, agent_type)
        return Response.json(200, {"ok": True})

    def _h_set_policy(
        self, tenant: str, body: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        mode = _enum(body, "policy_mode", POLICY_MODES, required=True)
        assert mode is not None
        self._registry.set_policy_mode(tenant, mode)
        _log.info("policy mode set (tenant=%s, policy_mode=%s)", tenant, mode)
        return Response.json(200, {"ok": True})

    # -- sessions ---------------------------------------------------------------------

    def _h_session_init(
        self, tenant: str, body: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        agent_type = _agent_type(body, required=False)
        metadata = _obj(body, "metadata")
        session_id = self._new_id()
        # Persisted: the wall clock, which means something after a restart.
        self._registry.create_session(session_id, tenant, agent_type, metadata, wall)
        return Response.json(200, {"session_id": session_id})

    def _h_session_close(
        self, tenant: str, body: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        session_id = _req_str(body, "session_id")
        if not self._registry.close_session(tenant, session_id, wall):
            return error_response(404, "SESSION_NOT_FOUND", "no such open session")
        return Response.json(200, {"ok": True})

    # -- dispatch ---------------------------------------------------------------------

    def _h_dispatch(
        self, tenant: str, body: dict[str, Any], request: HttpRequest, now: float, wall: float
    ) -> Effect:
        capability = _req_str(body, "capability", max_len=_MAX_CAPABILITY)
        arguments = _obj(body, "arguments") or {}
        agent_type = _agent_type(body, required=False)
        instance_id = None
        if _opt(body, "instance_id") is not None:
            instance_id = _instance_id(body)
        deadline = _int(body, "deadline_ms", lo=1, hi=self._max_deadline)
        session_id = _str(body, "session_id")
        context: dict[str, Any] = {"tenant_id": tenant}
        if session_id is not None:
            session = self._registry.get_session(session_id)
            if (
                session is None
                or session.get("tenant_id") != tenant
                or session.get("closed_at") is not None
            ):
                return error_response(404, "SESSION_NOT_FOUND", "no such open session")
            context["session_id"] = session_id
        if instance_id is not None:
            self._check_own(tenant, instance_id)
        try:
            lease = self._fleet.acquire(
                tenant, capability, agent_type=agent_type, instance_id=instance_id, now=now
            )
        except RouteError as err:
            return error_response(err.status, err.code, err.message)
        transport: Literal["ws", "callback"] = (
            "ws" if lease.deployment_mode == "connected" else "callback"
        )
        url: str | None = None
        if transport == "callback":
            row = self._registry.get_instance(lease.instance_id)
            if row is None or row.url is None:
                # Deregistered between routing and now: give the lease back.
                self._fleet.finished(lease, code="AGENT_UNAVAILABLE",
                                     message="the instance went away", transport=transport,
                                     seconds=0.0, now=now, wall=wall)
                return error_response(503, "AGENT_UNAVAILABLE", "no instance is available")
            url = row.url
        accept = request.header("accept") or ""
        return Dispatch(
            lease=lease,
            capability=capability,
            arguments=arguments,
            deadline_ms=deadline or self._default_deadline,
            session_context=context,
            stream="text/event-stream" in accept.lower(),
            transport=transport,
            url=url,
            started=now,
        )

    def dispatch_finished(
        self,
        dispatch: Dispatch,
        *,
        dispatch_id: str | None,
        result: Any = None,
        code: str | None = None,
        message: str | None = None,
        seconds: float,
        now: float,
        wall: float,
    ) -> Response:
        """Give the lease back (`fleet.finished`, once) and build the caller's answer:
        200 `{dispatch_id, instance_id, result}` or the error body with the spec 6 status."""
        try:
            self._fleet.finished(dispatch.lease, code=code, message=message,
                                 transport=dispatch.transport, seconds=seconds,
                                 now=now, wall=wall)
        except Exception:
            _log.exception("control plane failure releasing a dispatch lease")
        if code is None:
            try:
                return Response.json(200, {
                    "dispatch_id": dispatch_id,
                    "instance_id": dispatch.lease.instance_id,
                    "result": result,
                })
            except (TypeError, ValueError, msgspec.EncodeError):
                code, message = "DISPATCH_FAILED", "the agent's result is not valid JSON"
        status, safe_code, safe_message = _failure(code, message)
        return error_response(status, safe_code, safe_message)

    sse_chunk = staticmethod(sse_chunk)
    sse_result = staticmethod(sse_result)

    # -- GET paths --------------------------------------------------------------------

    def _h_events(
        self, tenant: str, _b: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        return Subscribe(tenant_id=tenant)

    def _h_metrics(
        self, _t: str, _b: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        content_type, text = self._metrics.render()
        return Response.raw(200, content_type, text)

    def _h_jwks(
        self, _t: str, _b: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        return Response.raw(200, "application/json", self._jwks_body)

    def _h_dashboard(
        self, _t: str, _b: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        if self._dashboard is None:
            return error_response(404, "NOT_FOUND", "no such path")
        return Response.raw(200, "text/html; charset=utf-8", self._dashboard, (
            ("content-security-policy", DASHBOARD_CSP),
            ("x-frame-options", "DENY"),
            ("referrer-policy", "no-referrer"),
        ))

    def _h_healthz(
        self, _t: str, _b: dict[str, Any], _r: HttpRequest, now: float, wall: float
    ) -> Effect:
        return Response.json(200, {"ok": True})


def _count(counts: dict[str, int], key: Any) -> None:
    if isinstance(key, str) and key in counts:
        counts[key] += 1


def _probe_reason(error: str) -> str:
    """The serving code's own short reason, kept to one printable line."""
    text = "".join(c if c.isprintable() else " " for c in error).strip()
    return text[:_MAX_PROBE_REASON] or "unreachable"


def _replace_card(row: InstanceRow, card: dict[str, Any]) -> InstanceRow:
    return replace(row, agent_card=card)
