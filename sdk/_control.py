"""The control-plane client (spec 6): token exchange, register, deregister, heartbeat,
sessions.

What to send and what an answer means is decided here once, without I/O: each operation is
a `Call` (path and JSON body), and `answer()` turns the status and body that came back into
the decoded object or the typed error (`svantic.errors`). `AsyncControl` (httpx's
`AsyncClient`, asyncio or trio) and `SyncControl` (httpx's `Client`, for gevent) only send
and wait, so the async and the gevent connector differ in nothing else.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from svantic_proto.errors import DispatchError

from .errors import SvanticApiError, error_for

__all__ = [
    "AsyncControl",
    "Call",
    "Registration",
    "SyncControl",
    "TokenGrant",
    "answer",
    "deregister_call",
    "heartbeat_call",
    "register_call",
    "renew_after",
    "session_close_call",
    "session_init_call",
    "token_call",
    "token_grant",
]

TIMEOUT: Final = 30.0
"""Seconds for one control-plane request (connect, write, read each)."""
RENEW_FRACTION: Final = 0.8
"""A token is exchanged again at this fraction of its lifetime (spec 1: before it expires)."""
MIN_RENEW: Final = 1.0


@dataclass(frozen=True, slots=True)
class Call:
    """One control-plane request: POST `path` with `body`; `authenticated` adds the bearer
    token. `secret_fields` are never logged."""

    path: str
    body: Mapping[str, Any]
    authenticated: bool = True
    secret_fields: tuple[str, ...] = ()

    def loggable(self) -> dict[str, Any]:
        return {k: ("<redacted>" if k in self.secret_fields else v) for k, v in self.body.items()}


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A transport JWT from `/auth/token`: valid for `expires_in` seconds."""

    access_token: str = field(repr=False)
    expires_in: float
    tenant_id: str | None
    expires_at: float | None = None
    """The token's own `exp` (Unix time), when it has one: what the mesh enforces."""


@dataclass(frozen=True, slots=True)
class Registration:
    """What `/agents/register` is told about one instance (seed 004)."""

    agent_type: str
    instance_id: str
    tools: list[dict[str, Any]]
    agent_card: dict[str, Any] | None
    dispatch_auth: Mapping[str, Any]
    max_concurrent_sessions: int
    url: str | None = None
    """The hosted agent's base url; None in connected mode."""


def token_call(client_id: str, client_secret: str) -> Call:
    return Call("/auth/token", {"client_id": client_id, "client_secret": client_secret},
                authenticated=False, secret_fields=("client_secret",))


def token_grant(body: Any) -> TokenGrant:
    """The grant in a 200 answer of `/auth/token`; an answer without a token is an error."""
    token = body.get("access_token") if isinstance(body, Mapping) else None
    if not isinstance(token, str) or not token:
        raise SvanticApiError(200, "INVALID_RESPONSE", "the token answer has no access_token")
    expires = body.get("expires_in")
    expires_in = float(expires) if isinstance(expires, int | float) and expires > 0 else 3600.0
    tenant = body.get("tenant_id")
    return TokenGrant(token, expires_in, tenant if isinstance(tenant, str) else None,
                      _expiry(token))


def _expiry(token: str) -> float | None:
    """The JWT's `exp`, read without checking the signature: only to schedule the renewal
    (the mesh checks the token; `expires_in` alone can be off by the issuer's rounding)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def renew_after(grant: TokenGrant, wall: float | None = None) -> float:
    """Seconds from now until the grant is exchanged again: 80% of its lifetime, counted
    from `wall` (Unix time now) to the token's `exp` when both are known."""
    lifetime = grant.expires_in
    if wall is not None and grant.expires_at is not None:
        lifetime = min(lifetime, grant.expires_at - wall)
    return max(MIN_RENEW, lifetime * RENEW_FRACTION)


def register_call(registration: Registration) -> Call:
    """`/agents/register`. A shared secret travels as the top-level `secret` (seed 004),
    never inside `dispatch_auth`."""
    auth = dict(registration.dispatch_auth)
    secret = auth.pop("secret", None)
    body: dict[str, Any] = {
        "agent_type": registration.agent_type,
        "instance_id": registration.instance_id,
        "deployment_mode": "hosted" if registration.url is not None else "connected",
        "tools": registration.tools,
        "dispatch_auth": auth,
        "max_concurrent_sessions": registration.max_concurrent_sessions,
    }
    if registration.agent_card is not None:
        body["agent_card"] = registration.agent_card
    if registration.url is not None:
        body["url"] = registration.url
    if secret is not None:
        body["secret"] = secret
    return Call("/agents/register", body, secret_fields=("secret",))


def deregister_call(instance_id: str) -> Call:
    return Call("/agents/deregister", {"instance_id": instance_id})


def heartbeat_call(instance_id: str, *, active_sessions: int, max_concurrent_sessions: int,
                   status: str | None = None) -> Call:
    """`/agents/heartbeat` (hosted mode; connected agents beat over their socket). `status`
    defaults to `busy` at the limit, else `available`."""
    if status is None:
        at_limit = 0 < max_concurrent_sessions <= active_sessions
        status = "busy" if at_limit else "available"
    return Call("/agents/heartbeat", {
        "instance_id": instance_id, "status": status, "active_sessions": active_sessions,
        "max_concurrent_sessions": max_concurrent_sessions})


def dispatch_call(tool: str, arguments: Mapping[str, Any] | None, *,
                  agent_type: str | None = None, instance_id: str | None = None,
                  deadline_ms: int | None = None) -> Call:
    """`/agents/dispatch`: how a hosted agent calls another agent's capability, since it
    has no socket for a spec 3 `tool_call` (the mesh routes it the same way)."""
    body: dict[str, Any] = {"capability": tool, "arguments": dict(arguments or {})}
    for name, value in (("agent_type", agent_type), ("instance_id", instance_id),
                        ("deadline_ms", deadline_ms)):
        if value is not None:
            body[name] = value
    return Call("/agents/dispatch", body)


def tool_value(body: Any) -> Any:
    """The result in `/agents/dispatch`'s answer."""
    return body.get("result") if isinstance(body, dict) else None


def tool_error(exc: SvanticApiError) -> DispatchError:
    """The `DispatchError` a connected agent's handler would see for the same failure, so
    `ctx.tool_call` raises one kind of exception in both modes."""
    return DispatchError("", exc.code, exc.message)


def session_init_call(agent_type: str | None, metadata: Mapping[str, Any] | None) -> Call:
    body: dict[str, Any] = {}
    if agent_type is not None:
        body["agent_type"] = agent_type
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return Call("/sessions/init", body)


def session_close_call(session_id: str) -> Call:
    return Call("/sessions/close", {"session_id": session_id})


def answer(status: int, content: bytes) -> Any:
    """The decoded body of a 2xx answer; otherwise raise the typed error with the server's
    code and message (`svantic.errors.error_for`)."""
    try:
        body = json.loads(content) if content else None
    except ValueError:
        body = None
    if 200 <= status < 300:
        if body is None:
            raise SvanticApiError(status, "INVALID_RESPONSE", "the mesh's answer is not JSON")
        return body
    raise error_for(status, body)


def _headers(call: Call, token: str | None) -> dict[str, str]:
    headers = {"accept": "application/json"}
    if call.authenticated:
        if token is None:
            raise SvanticApiError(401, "UNAUTHORIZED", "no token: connect first")
        headers["authorization"] = f"Bearer {token}"
    return headers


class AsyncControl:
    """The control plane over httpx's `AsyncClient` (asyncio, or trio through anyio)."""

    def __init__(self, base_url: str, verify: ssl.SSLContext) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, verify=verify, trust_env=False,
                                         timeout=TIMEOUT, follow_redirects=False)

    async def send(self, call: Call, token: str | None = None) -> Any:
        response = await self._client.post(call.path, json=dict(call.body),
                                           headers=_headers(call, token))
        return answer(response.status_code, response.content)

    async def aclose(self) -> None:
        await self._client.aclose()


class SyncControl:
    """The control plane over httpx's blocking `Client` (gevent: monkey-patched sockets)."""

    def __init__(self, base_url: str, verify: ssl.SSLContext) -> None:
        self._client = httpx.Client(base_url=base_url, verify=verify, trust_env=False,
                                    timeout=TIMEOUT, follow_redirects=False)

    def send(self, call: Call, token: str | None = None) -> Any:
        response = self._client.post(call.path, json=dict(call.body),
                                     headers=_headers(call, token))
        return answer(response.status_code, response.content)

    def close(self) -> None:
        self._client.close()
