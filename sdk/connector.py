"""`MeshConnector`: an `Agent` on a mesh: authentication, registration, the transport,
liveness, token renewal and sessions (seed: MeshConnector).

`connect()` exchanges the client credentials for a transport JWT (unless a `token` is given),
registers the instance (`/agents/register`: its type, one `tools` entry per capability, the
agent card, dispatch auth and `max_concurrent_sessions`), then either dials the
`connect_url` it is given over WebSocket (connected mode, the default: an adapter's `Agent`
running the agent's own capability registry) or serves the agent's `POST /send` itself and
heartbeats over HTTPS every 30 s (hosted mode, `svantic.hosted`). The JWT is exchanged again
at 80% of its lifetime and handed to the socket with `token_refresh`, so the connection is
never cut for it.

The control plane's requests and answers are `_control.py`'s, decided once; the async
connector (asyncio, or anyio on asyncio or trio) and the gevent one differ only in how they
wait. It logs under `svantic.sdk`: one INFO line per change of the connection's state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from svantic_proto import Config, DispatchAuthVerifier
from svantic_proto.auth import dispatch_auth_enabled
from svantic_proto.backoff import backoff_delays
from svantic_proto.errors import HandshakeRejected
from svantic_proto.events import ConnectionClosed, SessionStarted

from . import _control
from ._control import Registration, TokenGrant
from .errors import NotConnectedError, SvanticApiError

if TYPE_CHECKING:
    from .agent import Agent

__all__ = [
    "DEFAULT_SVANTIC_URL",
    "ENV_CA_FILE",
    "ENV_CLIENT_ID",
    "ENV_CLIENT_SECRET",
    "ENV_DISPATCH_AUTH_ENABLED",
    "ENV_INSTANCE_ID",
    "ENV_SIGNING_SECRET",
    "ENV_URL",
    "GeventMeshConnector",
    "MeshConnector",
]

log = logging.getLogger("svantic.sdk")

DEFAULT_SVANTIC_URL: Final = "https://127.0.0.1:8443"
"""Where `svantic mesh` listens by default; used when neither `svantic_url` nor
`SVANTIC_URL` is given."""
ENV_URL: Final = "SVANTIC_URL"
ENV_CLIENT_ID: Final = "SVANTIC_CLIENT_ID"
ENV_CLIENT_SECRET: Final = "SVANTIC_CLIENT_SECRET"
ENV_SIGNING_SECRET: Final = "SVANTIC_SIGNING_SECRET"
ENV_DISPATCH_AUTH_ENABLED: Final = "SVANTIC_DISPATCH_AUTH_ENABLED"
ENV_INSTANCE_ID: Final = "SVANTIC_INSTANCE_ID"
ENV_CA_FILE: Final = "SVANTIC_CA_FILE"
HEARTBEAT_INTERVAL: Final = 30.0
"""Seconds between a hosted agent's HTTP heartbeats."""
RETRY_RENEWAL: Final = 5.0
"""Seconds before a failed token renewal is tried again (while the old token lasts)."""

Adapter = Literal["asyncio", "anyio", "gevent"]


@dataclass(frozen=True, slots=True)
class Settings:
    """The connector's options with the environment and defaults applied (pure)."""

    svantic_url: str
    client_id: str | None
    client_secret: str | None
    token: str | None
    deployment_mode: str
    public_url: str | None
    listen: tuple[str, int] | None
    certfile: str | None
    keyfile: str | None
    dispatch_auth: Mapping[str, Any]
    signing_secret: str | None
    auth_enabled: bool
    max_concurrent_sessions: int
    instance_id: str
    cafile: str | None
    adapter: Adapter


def resolve(agent: Agent, options: Mapping[str, Any], environ: Mapping[str, str],
            *, hostname: str, pid: int) -> Settings:
    """Fill the options from `environ` and the defaults; raise ValueError for options that
    cannot work together, here rather than halfway through `connect()`."""
    given = options.get("adapter") or "asyncio"
    if given not in ("asyncio", "anyio", "gevent"):
        raise ValueError(f"adapter must be asyncio, anyio or gevent, not {given!r}")
    adapter = cast(Adapter, given)
    url = (options.get("svantic_url") or environ.get(ENV_URL) or DEFAULT_SVANTIC_URL)
    url = url.rstrip("/")
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"svantic_url must be an https:// url, not {url!r}")
    token = options.get("token")
    client_id = options.get("client_id") or environ.get(ENV_CLIENT_ID)
    client_secret = options.get("client_secret") or environ.get(ENV_CLIENT_SECRET)
    if token is None and not (client_id and client_secret):
        raise ValueError("give client_id and client_secret (or SVANTIC_CLIENT_ID and "
                         "SVANTIC_CLIENT_SECRET), or a token")
    public_url = options.get("public_url")
    mode = options.get("deployment_mode") or ("hosted" if public_url else "connected")
    if mode not in ("connected", "hosted"):
        raise ValueError(f"deployment_mode must be connected or hosted, not {mode!r}")
    listen = options.get("listen")
    if listen is not None:
        listen = (str(listen[0]), int(listen[1]))
    certfile, keyfile = options.get("certfile"), options.get("keyfile")
    if mode == "hosted" and certfile is None and public_url is None:
        raise ValueError("hosted mode needs certfile/keyfile (the mesh calls https:// only) "
                         "or a public_url served by a TLS proxy in front")
    auth = dict(options.get("dispatch_auth") or {"type": "svantic_jwt"})
    auth_type = auth.get("type", "svantic_jwt")
    auth["type"] = auth_type
    if auth_type not in ("svantic_jwt", "shared_secret"):
        raise ValueError("dispatch_auth type must be svantic_jwt or shared_secret")
    if auth_type == "shared_secret" and not auth.get("secret"):
        raise ValueError("dispatch_auth shared_secret needs its 'secret'")
    signing = options.get("signing_secret") or environ.get(ENV_SIGNING_SECRET)
    enabled = dispatch_auth_enabled(environ)
    if enabled and auth_type == "svantic_jwt" and not signing:
        raise ValueError("dispatch auth is on: give signing_secret (or SVANTIC_SIGNING_SECRET) "
                         "to verify the mesh's envelopes, or set "
                         "SVANTIC_DISPATCH_AUTH_ENABLED=false on the mesh and here")
    limit = options.get("max_concurrent_sessions")
    if limit is None:
        limit = agent.max_concurrent_sessions
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError("max_concurrent_sessions must be an integer >= 0")
    instance_id = options.get("instance_id") or environ.get(ENV_INSTANCE_ID)
    if not instance_id:
        port = listen[1] if listen is not None and listen[1] else None
        instance_id = f"{hostname}-{port or pid}"
    return Settings(
        svantic_url=url, client_id=client_id, client_secret=client_secret, token=token,
        deployment_mode=mode, public_url=public_url.rstrip("/") if public_url else None,
        listen=listen, certfile=certfile, keyfile=keyfile, dispatch_auth=auth,
        signing_secret=signing, auth_enabled=enabled, max_concurrent_sessions=limit,
        instance_id=instance_id, cafile=options.get("cafile") or environ.get(ENV_CA_FILE),
        adapter=adapter)


def build_verifier(settings: Settings) -> DispatchAuthVerifier:
    """How this instance checks each dispatch's envelope (spec 7): the mesh's signing secret
    (svantic_jwt) or the registered shared secret; off only when the environment says so."""
    auth = settings.dispatch_auth
    if auth.get("type") == "shared_secret":
        return DispatchAuthVerifier(settings.instance_id, shared_secret=str(auth["secret"]),
                                    enabled=settings.auth_enabled)
    if not settings.auth_enabled:
        return DispatchAuthVerifier(settings.instance_id, enabled=False)
    assert settings.signing_secret is not None  # resolve() refused it otherwise
    return DispatchAuthVerifier(settings.instance_id, hs256_keys=[settings.signing_secret])


_OPTIONS: Final = frozenset({
    "svantic_url", "client_id", "client_secret", "token", "deployment_mode", "public_url",
    "listen", "certfile", "keyfile", "dispatch_auth", "signing_secret",
    "max_concurrent_sessions", "instance_id", "cafile", "ssl_context", "adapter",
    "connect_timeout", "environ", "config",
})


class _ConnectorBase:
    """What the async and the gevent connector share: the options, the registration, the
    verifier, the properties and the state-change log."""

    def __init__(self, agent: Agent, svantic_url: str | None = None, *,
                 client_id: str | None = None, client_secret: str | None = None,
                 token: str | None = None, deployment_mode: str | None = None,
                 public_url: str | None = None, listen: tuple[str, int] | None = None,
                 certfile: str | None = None, keyfile: str | None = None,
                 dispatch_auth: Mapping[str, Any] | None = None,
                 signing_secret: str | None = None, max_concurrent_sessions: int | None = None,
                 instance_id: str | None = None, cafile: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, adapter: str = "asyncio",
                 connect_timeout: float = 30.0, config: Config | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        options = {
            "svantic_url": svantic_url, "client_id": client_id, "client_secret": client_secret,
            "token": token, "deployment_mode": deployment_mode, "public_url": public_url,
            "listen": listen, "certfile": certfile, "keyfile": keyfile,
            "dispatch_auth": dispatch_auth, "signing_secret": signing_secret,
            "max_concurrent_sessions": max_concurrent_sessions, "instance_id": instance_id,
            "cafile": cafile, "adapter": adapter,
        }
        env = os.environ if environ is None else environ
        self.settings = resolve(agent, options, env, hostname=socket.gethostname(),
                                pid=os.getpid())
        self.verifier = build_verifier(self.settings)
        self._agent = agent
        self._ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        """Seconds `connect()` waits for the first welcome before it gives up."""
        self.config = config
        """The transport's `svantic_proto.Config` (timeouts, backoff); None: defaults."""
        self._token: str | None = token
        self._grant: TokenGrant | None = None
        self._connected = False
        self._deployment_mode: str | None = None
        self._transport: Any = None
        self._hosted: Any = None
        self.registration: dict[str, Any] | None = None
        """The mesh's answer to the last registration."""
        self._state = "disconnected"
        self._rejoining = False
        self.on_event: Callable[[Any], object] | None = None
        """Told every event of the WebSocket transport, whichever transport carries it now
        (`SessionStarted`, `ConnectionClosed`, ...): for metrics and tests; it must not
        block. Set it before `connect()` to see the first welcome too."""

    # -- what users read ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a registration is active (between `connect()` and `disconnect()`)."""
        return self._connected

    @property
    def svantic_url(self) -> str:
        return self.settings.svantic_url

    @property
    def token(self) -> str | None:
        """The current transport JWT; None before `connect()` and after `disconnect()`."""
        return self._token if self._connected else None

    @property
    def deployment_mode(self) -> str | None:
        """`connected` or `hosted`, from the registration's answer; None before."""
        return self._deployment_mode

    @property
    def agent(self) -> Agent:
        return self._agent

    @property
    def instance_id(self) -> str:
        return self.settings.instance_id

    @property
    def ws_transport(self) -> Any:
        """The adapter's `Agent` carrying the WebSocket (connected mode), else None."""
        return self._transport

    @property
    def hosted_server(self) -> Any:
        """The server answering `POST /send` (hosted mode), else None."""
        return self._hosted

    # -- shared decisions ---------------------------------------------------------------------

    def _client_context(self) -> ssl.SSLContext:
        """TLS trust for the mesh: the caller's context, else the system's plus `cafile`. A
        fresh one per use, since httpx sets its own ALPN on the context it is given."""
        if self._ssl_context is not None:
            return self._ssl_context
        return ssl.create_default_context(cafile=self.settings.cafile)

    def _server_context(self) -> ssl.SSLContext | None:
        settings = self.settings
        if settings.certfile is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.certfile, settings.keyfile)
        return context

    def _registration(self, url: str | None) -> Registration:
        agent = self._agent
        return Registration(
            agent_type=agent.agent_type, instance_id=self.settings.instance_id,
            tools=agent.tools(), agent_card=agent.agent_card(url),
            dispatch_auth=self.settings.dispatch_auth,
            max_concurrent_sessions=self.settings.max_concurrent_sessions, url=url)

    def _registered(self, body: Any) -> str | None:
        """Keep the registration's answer; returns the `connect_url` (connected mode)."""
        self.registration = dict(body) if isinstance(body, Mapping) else {}
        self._deployment_mode = str(self.registration.get("deployment_mode")
                                    or self.settings.deployment_mode)
        connect_url = self.registration.get("connect_url")
        return connect_url if isinstance(connect_url, str) else None

    def _transport_options(self, connect_url: str) -> dict[str, Any]:
        return {
            "token": self._token, "instance_id": self.settings.instance_id,
            "dispatch_auth": self.verifier, "agent_type": self._agent.agent_type,
            "ssl_context": self._client_context(), "capabilities": self._agent.registry,
            "max_concurrent_sessions": self.settings.max_concurrent_sessions,
            "config": self.config,
        }

    def _credentials(self) -> tuple[str, str] | None:
        settings = self.settings
        if settings.client_id and settings.client_secret:
            return settings.client_id, settings.client_secret
        return None

    def _granted(self, grant: TokenGrant) -> None:
        self._grant = grant
        self._token = grant.access_token

    def _set_state(self, state: str, detail: str = "") -> None:
        """One INFO line per change of the connection's state."""
        if state == self._state:
            return
        self._state = state
        log.info("%s: %s%s", self.settings.instance_id, state, f" ({detail})" if detail else "")

    def _on_transport_event(self, event: Any) -> None:
        self._track(event)
        hook = self.on_event
        if hook is not None:
            try:
                hook(event)
            except Exception:  # an application callback must not stop the connector
                log.exception("%s: on_event failed", self.settings.instance_id)

    def _track(self, event: Any) -> None:
        if isinstance(event, SessionStarted):
            self._set_state("connected", "resumed" if event.resumed else
                            f"connection {event.connection_id}")
        elif isinstance(event, ConnectionClosed) and self._connected:
            if self._forgotten(event):
                self._rejoining = True
                self._set_state("registering again", "the mesh does not know this instance")
                self._start_rejoin()
                return
            self._set_state("reconnecting", f"close code {event.code}")

    def _forgotten(self, event: ConnectionClosed) -> bool:
        """A handshake answered 404 `INSTANCE_NOT_FOUND`: the mesh no longer knows this
        instance (it lost its registry, or deregistered the instance). Spec 5 does not retry
        a 404, so the transport stops for good; the connector holds what the registration
        needs, so it registers again and dials the new `connect_url` (one rejoin at a time)."""
        error = event.error
        return (isinstance(error, HandshakeRejected) and error.status == 404
                and self._deployment_mode == "connected" and not self._rejoining)

    def _start_rejoin(self) -> None:
        """Run `_rejoin` in the connector's concurrency (a task, or a greenlet)."""
        raise NotImplementedError

    def _rejoin_delays(self) -> Iterator[float]:
        """The transport's own backoff (spec 5: doubling, capped, jittered) between tries."""
        config = self.config or Config()
        return backoff_delays(random.random, base=config.reconnect_base_delay,
                              cap=config.reconnect_max_delay)

    def _transport_ready(self) -> bool:
        transport = self._transport
        return transport is not None and transport.ready.is_set()

    def _after_refresh(self, sent: bool) -> None:
        """Spec 3: a mesh that does not take `token_refresh` gets the new token by a
        reconnect (the session resumes); without a session the next dial uses it anyway."""
        if not sent and self._transport_ready():
            log.info("%s: token_refresh not accepted: reconnecting with the new token",
                     self.settings.instance_id)
            link = self._transport.link
            if link is not None:
                link.abort()

    def _active_sessions(self) -> int:
        hosted = self._hosted
        app = getattr(hosted, "app", None)
        running = getattr(app, "running", None)
        return len(running) if running is not None else 0

    def _heartbeat(self) -> _control.Call:
        return _control.heartbeat_call(
            self.settings.instance_id, active_sessions=self._active_sessions(),
            max_concurrent_sessions=self.settings.max_concurrent_sessions)

    def _hosted_module(self) -> Any:
        try:
            from . import hosted
        except ImportError as exc:
            raise NotImplementedError("hosted mode needs svantic.hosted, which is not "
                                      f"available: {exc}") from None
        if not hasattr(hosted, "serve"):
            raise NotImplementedError("hosted mode needs svantic.hosted.serve")
        return hosted

    def _require_connected(self) -> None:
        if not self._connected:
            raise NotConnectedError("not connected: call connect() first")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(instance_id={self.settings.instance_id!r}, "
                f"svantic_url={self.settings.svantic_url!r}, state={self._state!r})")


class _Tasks:
    """Background tasks of the async connector: asyncio tasks, or an anyio task group
    (opened in `connect()`'s task, closed in `disconnect()`'s, which must be the same)."""

    def __init__(self, use_anyio: bool) -> None:
        self._anyio = use_anyio
        self._group: Any = None
        self._tasks: set[Any] = set()

    async def open(self) -> None:
        if self._anyio:
            import anyio

            self._group = anyio.create_task_group()
            await self._group.__aenter__()

    def spawn(self, function: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._group is not None:
            self._group.start_soon(function)
            return
        import asyncio

        task = asyncio.get_running_loop().create_task(function())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def sleep(self, seconds: float) -> None:
        if self._anyio:
            import anyio

            await anyio.sleep(seconds)
        else:
            import asyncio

            await asyncio.sleep(seconds)

    async def close(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)
        tasks = list(self._tasks)
        self._tasks = set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def _bounded(awaitable: Awaitable[Any], seconds: float, *, use_anyio: bool) -> Any:
    if use_anyio:
        import anyio

        with anyio.fail_after(seconds):
            return await awaitable
    import asyncio

    async with asyncio.timeout(seconds):
        return await awaitable


class MeshConnector(_ConnectorBase):
    """An agent's connection to a mesh (asyncio, or anyio on asyncio or trio). See the
    module doc; `adapter="gevent"` makes a `GeventMeshConnector` (blocking methods).

    On anyio, call `disconnect()` from the task that called `connect()` (the transport's
    task group is that task's), or use `async with connector:`."""

    def __new__(cls, agent: Agent, *args: Any, **kwargs: Any) -> Any:
        if cls is MeshConnector and kwargs.get("adapter") == "gevent":
            return GeventMeshConnector(agent, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, agent: Agent, svantic_url: str | None = None, **options: Any) -> None:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise TypeError(f"unknown MeshConnector options: {', '.join(sorted(unknown))}")
        super().__init__(agent, svantic_url, **options)
        self._use_anyio = self.settings.adapter == "anyio"
        self._control: _control.AsyncControl | None = None
        self._tasks = _Tasks(self._use_anyio)
        self._held: set[Any] = set()
        """anyio: transports a rejoin task entered, and exits itself."""
        self._stale: list[Any] = []
        """anyio: transports replaced by a rejoin, exited by `disconnect()`'s task."""

    async def __aenter__(self) -> MeshConnector:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    async def connect(self) -> None:
        """Token exchange (unless `token`), register, then dial (connected) or serve and
        heartbeat (hosted). Returns once the agent can be dispatched to; on a failure what
        was started is stopped again and the error raised."""
        if self._connected:
            return
        settings = self.settings
        self._set_state("connecting", settings.svantic_url)
        self._control = _control.AsyncControl(settings.svantic_url, self._client_context())
        await self._tasks.open()
        try:
            if settings.token is None:  # else the caller's token, as is
                self._granted(await self._exchange())
            url = None
            if settings.deployment_mode == "hosted":
                url = await self._serve_hosted()
            connect_url = self._registered(await self._send(
                _control.register_call(self._registration(url))))
            self._set_state("registered", f"mode {self._deployment_mode}")
            if self._deployment_mode == "connected":
                if connect_url is None:
                    raise NotConnectedError("the registration's answer has no connect_url")
                await self._dial(connect_url)
            else:
                self._tasks.spawn(self._heartbeats)
                self._set_state("connected", f"hosted at {url}")
            if self._grant is not None and self._credentials() is not None:
                self._tasks.spawn(self._renewals)
            self._connected = True
        except BaseException:
            await self._teardown(deregister=False)
            raise

    async def disconnect(self) -> None:
        """Stop the transport (in-flight dispatches get the close grace), deregister, and
        forget the token. Safe when not connected."""
        if not self._connected and self._control is None:
            return
        self._set_state("disconnecting")
        await self._teardown(deregister=self._connected)

    async def _teardown(self, *, deregister: bool) -> None:
        self._connected = False
        transport, self._transport = self._transport, None
        stale, self._stale = self._stale, []
        for old in [*stale, transport]:
            if old is None:
                continue
            try:
                if old in self._held:  # its own task exits it, once the group is cancelled
                    await old.stop()
                else:
                    await old.__aexit__(None, None, None)
            except Exception:
                log.exception("%s: stopping the transport failed", self.settings.instance_id)
        hosted, self._hosted = self._hosted, None
        if hosted is not None:
            try:
                await hosted.close()
            except Exception:
                log.exception("%s: stopping the hosted server failed",
                              self.settings.instance_id)
        control, self._control = self._control, None
        if control is not None:
            if deregister:
                try:
                    await control.send(_control.deregister_call(self.settings.instance_id),
                                       self._token)
                except Exception as exc:  # the mesh forgets it at its own timeout anyway
                    log.warning("%s: deregister failed: %s", self.settings.instance_id, exc)
            await control.aclose()
        await self._tasks.close()
        self._token = self.settings.token
        self._grant = None
        self._set_state("disconnected")

    async def re_register(self) -> None:
        """Register again with the current capabilities (say one defined at run time), so
        the mesh routes to them; no reconnect."""
        self._require_connected()
        url = self._hosted.url if self._hosted is not None else None
        if self.settings.public_url is not None:
            url = self.settings.public_url
        self._registered(await self._send(_control.register_call(self._registration(url))))
        log.info("%s: re-registered (%d capabilities)", self.settings.instance_id,
                 len(self._agent.capabilities))

    async def refresh_token(self, jwt: str) -> None:
        """Use `jwt` from now on: on the socket through `token_refresh` (no reconnect), for
        the control plane and for every reconnect."""
        if not isinstance(jwt, str) or not jwt:
            raise ValueError("refresh_token needs a JWT")
        self._token = jwt
        transport = self._transport
        if transport is not None:
            self._after_refresh(transport.refresh_token(jwt))

    async def create_session(self, agent_type: str | None = None,
                             metadata: Mapping[str, Any] | None = None) -> str:
        """`/sessions/init`: a new session id (dispatches that carry it share a session)."""
        self._require_connected()
        body = await self._send(_control.session_init_call(agent_type, metadata))
        return str(body["session_id"])

    async def close_session(self, session_id: str) -> None:
        """`/sessions/close`."""
        self._require_connected()
        await self._send(_control.session_close_call(session_id))

    # -- inside ------------------------------------------------------------------------------

    async def _send(self, call: _control.Call) -> Any:
        if self._control is None:
            raise NotConnectedError("not connected: call connect() first")
        return await self._control.send(call, self._token)

    async def _exchange(self) -> TokenGrant:
        credentials = self._credentials()
        assert credentials is not None
        return _control.token_grant(await self._send(_control.token_call(*credentials)))

    async def _fresh_token(self) -> str:
        """The transport's token provider (a 401 on reconnect): exchange again."""
        self._granted(await self._exchange())
        assert self._token is not None
        return self._token

    async def _dial(self, connect_url: str) -> None:
        if self._use_anyio:
            from svantic_adapters.anyio import Agent as AnyioTransport

            transport: Any = AnyioTransport(
                connect_url, token_provider=self._provider(), **self._transport_options(
                    connect_url))
        else:
            from svantic_adapters.asyncio import Agent as AsyncioTransport

            transport = AsyncioTransport(
                connect_url, token_provider=self._provider(), **self._transport_options(
                    connect_url))
        transport.on_event = self._on_transport_event
        self._transport = transport
        self._set_state("dialling", connect_url)
        try:
            if self._use_anyio:  # its task group is this task's: no timeout scope around it
                self._tasks.spawn(lambda: self._dial_watchdog(transport))
                await transport.__aenter__()
                if not transport.ready.is_set():
                    raise TimeoutError(f"no welcome within {self.connect_timeout:g} s")
            else:
                await _bounded(transport.__aenter__(), self.connect_timeout, use_anyio=False)
        except BaseException:
            self._transport = None
            with contextlib.suppress(Exception):
                await transport.__aexit__(None, None, None)
            raise

    async def _dial_watchdog(self, transport: Any) -> None:
        """anyio: stop a transport still without a welcome at `connect_timeout`, so that
        `connect()` (waiting in its `__aenter__`) returns and raises TimeoutError."""
        await self._tasks.sleep(self.connect_timeout)
        if self._transport is transport and not transport.ready.is_set():
            transport.runtime.stop(transport._now(), 0)
            transport.pump.service()

    def _provider(self) -> Callable[[], Awaitable[str]] | None:
        return self._fresh_token if self._credentials() is not None else None

    def _start_rejoin(self) -> None:
        self._tasks.spawn(self._rejoin)

    async def _rejoin(self) -> None:
        """Register again and dial, with backoff, until it works or `disconnect()`.

        On anyio a transport's task group is the task's that entered it, so this task enters
        the new transport and stays in it (`_hold`) until it ends; the old one, entered by
        `connect()`'s task, is left for `disconnect()` to exit there."""
        try:
            for delay in self._rejoin_delays():
                if not self._connected:
                    return
                old, self._transport = self._transport, None
                if old is not None:
                    if self._use_anyio:
                        self._stale.append(old)
                    else:
                        with contextlib.suppress(Exception):
                            await old.__aexit__(None, None, None)
                try:
                    connect_url = self._registered(await self._send(
                        _control.register_call(self._registration(None))))
                    if connect_url is None:
                        raise NotConnectedError("the registration's answer has no connect_url")
                    if self._use_anyio:
                        await self._hold(connect_url)
                        if not self._connected:
                            return
                        raise NotConnectedError("the new connection ended")
                    await self._dial(connect_url)
                except HandshakeRejected as exc:
                    if exc.status != 404:  # final (spec 5), as for the first transport
                        log.warning("%s: giving up: %s", self.instance_id, exc)
                        return
                    log.warning("%s: the mesh does not know this instance again; next try "
                                "in %.1f s", self.instance_id, delay)
                    await self._tasks.sleep(delay)
                    continue
                except Exception as exc:
                    log.warning("%s: registering again failed (%s); next try in %.1f s",
                                self.instance_id, exc, delay)
                    await self._tasks.sleep(delay)
                    continue
                log.info("%s: registered again", self.instance_id)
                return
        finally:
            self._rejoining = False

    async def _hold(self, connect_url: str) -> None:
        """anyio: dial in this task and stay until the transport ends (a final refusal
        raises) or `disconnect()` stops it. `_rejoining` stays set meanwhile: this task is
        the one that registers again, should the mesh forget the instance once more."""
        from svantic_adapters.anyio import Agent as AnyioTransport

        transport = AnyioTransport(connect_url, token_provider=self._provider(),
                                   **self._transport_options(connect_url))
        transport.on_event = self._on_transport_event
        self._transport = transport
        self._held.add(transport)
        self._set_state("dialling", connect_url)
        try:
            async with transport:
                log.info("%s: registered again", self.instance_id)
                await transport.run()
        finally:
            self._held.discard(transport)
            if self._transport is transport:  # exited here: nothing left for disconnect()
                self._transport = None

    async def _serve_hosted(self) -> str:
        hosted = self._hosted_module()
        host, port = self.settings.listen or ("127.0.0.1", 0)
        app = hosted.HostedApp(self._agent, verifier=self.verifier,
                               public_url=self.settings.public_url,
                               tool_caller=self._hosted_tool_call)
        self._hosted = await hosted.serve(
            self._agent, verifier=self.verifier, host=host, port=port,
            ssl_context=self._server_context(), adapter=self.settings.adapter,
            public_url=self.settings.public_url, app=app)
        return str(self.settings.public_url or self._hosted.url)

    async def _hosted_tool_call(self, tool: str, arguments: Mapping[str, Any] | None = None,
                                *, deadline_ms: int | None = None,
                                agent_type: str | None = None, instance_id: str | None = None,
                                session_id: str | None = None) -> Any:
        """`ctx.tool_call` in hosted mode: through `/agents/dispatch` (no socket here)."""
        try:
            body = await self._send(_control.dispatch_call(
                tool, arguments, agent_type=agent_type, instance_id=instance_id,
                deadline_ms=deadline_ms))
        except SvanticApiError as exc:
            raise _control.tool_error(exc) from None
        return _control.tool_value(body)

    async def _heartbeats(self) -> None:
        """Hosted mode: POST /agents/heartbeat every 30 s (a failure is logged, not fatal)."""
        while True:
            await self._tasks.sleep(HEARTBEAT_INTERVAL)
            try:
                await self._send(self._heartbeat())
            except Exception as exc:
                log.warning("%s: heartbeat failed: %s", self.settings.instance_id, exc)

    async def _renewals(self) -> None:
        """Exchange the token again at 80% of its lifetime and hand it to the socket."""
        while True:
            grant = self._grant
            delay = _control.renew_after(grant, time.time()) if grant else RETRY_RENEWAL
            await self._tasks.sleep(delay)
            try:
                self._granted(await self._exchange())
            except Exception as exc:
                log.warning("%s: token renewal failed: %s", self.settings.instance_id, exc)
                self._grant = None  # retry soon
                continue
            log.info("%s: token renewed", self.settings.instance_id)
            transport = self._transport
            if transport is not None and self._token is not None:
                self._after_refresh(transport.refresh_token(self._token))


class GeventMeshConnector(_ConnectorBase):
    """`MeshConnector(adapter="gevent")`: the same methods, blocking. Call them from a
    greenlet (after `gevent.monkey.patch_all()` when the application patches); the
    transport is `svantic_adapters.gevent.Agent`, the control plane httpx's `Client`."""

    def __init__(self, agent: Agent, svantic_url: str | None = None, **options: Any) -> None:
        unknown = set(options) - _OPTIONS
        if unknown:
            raise TypeError(f"unknown MeshConnector options: {', '.join(sorted(unknown))}")
        options["adapter"] = "gevent"
        super().__init__(agent, svantic_url, **options)
        self._control: _control.SyncControl | None = None
        self._greenlets: list[Any] = []

    def __enter__(self) -> GeventMeshConnector:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    def _check_handlers(self) -> None:
        """gevent runs plain functions (each in a greenlet): a coroutine function could
        never be awaited there, so it is refused before the mesh can route to it."""
        from .agent import _is_async

        for name in self._agent.capabilities:
            if _is_async(self._agent.handler(name)):
                raise ValueError(f"capability {name!r} is a coroutine function: on gevent, "
                                 "handlers are plain functions")

    def connect(self) -> None:
        """As `MeshConnector.connect`, blocking this greenlet."""
        if self._connected:
            return
        import gevent

        self._check_handlers()

        settings = self.settings
        self._set_state("connecting", settings.svantic_url)
        self._control = _control.SyncControl(settings.svantic_url, self._client_context())
        try:
            if settings.token is None:  # else the caller's token, as is
                self._granted(self._exchange())
            url = None
            if settings.deployment_mode == "hosted":
                url = self._serve_hosted()
            connect_url = self._registered(self._send(
                _control.register_call(self._registration(url))))
            self._set_state("registered", f"mode {self._deployment_mode}")
            if self._deployment_mode == "connected":
                if connect_url is None:
                    raise NotConnectedError("the registration's answer has no connect_url")
                self._dial(connect_url)
            else:
                self._greenlets.append(gevent.spawn(self._heartbeats))
                self._set_state("connected", f"hosted at {url}")
            if self._grant is not None and self._credentials() is not None:
                self._greenlets.append(gevent.spawn(self._renewals))
            self._connected = True
        except BaseException:
            self._teardown(deregister=False)
            raise

    def disconnect(self) -> None:
        """As `MeshConnector.disconnect`, blocking. Safe when not connected."""
        if not self._connected and self._control is None:
            return
        self._set_state("disconnecting")
        self._teardown(deregister=self._connected)

    def _teardown(self, *, deregister: bool) -> None:
        import gevent

        self._connected = False
        greenlets, self._greenlets = self._greenlets, []
        gevent.killall(greenlets, block=True, timeout=5)
        transport, self._transport = self._transport, None
        if transport is not None:
            try:
                transport.stop()
            except Exception:
                log.exception("%s: stopping the transport failed", self.settings.instance_id)
        hosted, self._hosted = self._hosted, None
        if hosted is not None:
            try:
                hosted.close()
            except Exception:
                log.exception("%s: stopping the hosted server failed",
                              self.settings.instance_id)
        control, self._control = self._control, None
        if control is not None:
            if deregister:
                try:
                    control.send(_control.deregister_call(self.settings.instance_id),
                                 self._token)
                except Exception as exc:
                    log.warning("%s: deregister failed: %s", self.settings.instance_id, exc)
            control.close()
        self._token = self.settings.token
        self._grant = None
        self._set_state("disconnected")

    def re_register(self) -> None:
        """As `MeshConnector.re_register`, blocking."""
        self._require_connected()
        self._check_handlers()
        url = self.settings.public_url or (self._hosted.url if self._hosted else None)
        self._registered(self._send(_control.register_call(self._registration(url))))
        log.info("%s: re-registered (%d capabilities)", self.settings.instance_id,
                 len(self._agent.capabilities))

    def refresh_token(self, jwt: str) -> None:
        """As `MeshConnector.refresh_token`, blocking."""
        if not isinstance(jwt, str) or not jwt:
            raise ValueError("refresh_token needs a JWT")
        self._token = jwt
        transport = self._transport
        if transport is not None:
            self._after_refresh(transport.refresh_token(jwt))

    def create_session(self, agent_type: str | None = None,
                       metadata: Mapping[str, Any] | None = None) -> str:
        self._require_connected()
        body = self._send(_control.session_init_call(agent_type, metadata))
        return str(body["session_id"])

    def close_session(self, session_id: str) -> None:
        self._require_connected()
        self._send(_control.session_close_call(session_id))

    # -- inside ------------------------------------------------------------------------------

    def _send(self, call: _control.Call) -> Any:
        if self._control is None:
            raise NotConnectedError("not connected: call connect() first")
        return self._control.send(call, self._token)

    def _exchange(self) -> TokenGrant:
        credentials = self._credentials()
        assert credentials is not None
        return _control.token_grant(self._send(_control.token_call(*credentials)))

    def _fresh_token(self) -> str:
        self._granted(self._exchange())
        assert self._token is not None
        return self._token

    def _start_rejoin(self) -> None:
        import gevent

        self._greenlets.append(gevent.spawn(self._rejoin))

    def _rejoin(self) -> None:
        """As `MeshConnector._rejoin`, in a greenlet."""
        import gevent

        try:
            for delay in self._rejoin_delays():
                if not self._connected:
                    return
                old, self._transport = self._transport, None
                if old is not None:
                    with contextlib.suppress(Exception):
                        old.stop(0)
                try:
                    connect_url = self._registered(self._send(
                        _control.register_call(self._registration(None))))
                    if connect_url is None:
                        raise NotConnectedError("the registration's answer has no connect_url")
                    self._dial(connect_url)
                except HandshakeRejected as exc:
                    if exc.status != 404:  # final (spec 5), as for the first transport
                        log.warning("%s: giving up: %s", self.instance_id, exc)
                        return
                    log.warning("%s: the mesh does not know this instance again; next try "
                                "in %.1f s", self.instance_id, delay)
                    gevent.sleep(delay)
                    continue
                except Exception as exc:
                    log.warning("%s: registering again failed (%s); next try in %.1f s",
                                self.instance_id, exc, delay)
                    gevent.sleep(delay)
                    continue
                log.info("%s: registered again", self.instance_id)
                return
        finally:
            self._rejoining = False

    def _dial(self, connect_url: str) -> None:
        from svantic_adapters.gevent import Agent as GeventTransport

        provider = self._fresh_token if self._credentials() is not None else None
        transport = GeventTransport(connect_url, token_provider=provider,
                                    **self._transport_options(connect_url))
        transport.on_event = self._on_transport_event
        self._transport = transport
        self._set_state("dialling", connect_url)
        try:
            transport.start()
            transport.wait_ready(self.connect_timeout)
        except BaseException:
            self._transport = None
            with contextlib.suppress(Exception):
                transport.stop(0)
            raise

    def _serve_hosted(self) -> str:
        hosted = self._hosted_module()
        host, port = self.settings.listen or ("127.0.0.1", 0)
        app = hosted.HostedApp(self._agent, verifier=self.verifier,
                               public_url=self.settings.public_url,
                               tool_caller=self._hosted_tool_call)
        self._hosted = hosted.serve(
            self._agent, verifier=self.verifier, host=host, port=port,
            ssl_context=self._server_context(), adapter="gevent",
            public_url=self.settings.public_url, app=app)
        return str(self.settings.public_url or self._hosted.url)

    def _hosted_tool_call(self, tool: str, arguments: Mapping[str, Any] | None = None, *,
                          deadline_ms: int | None = None, agent_type: str | None = None,
                          instance_id: str | None = None, session_id: str | None = None) -> Any:
        """`ctx.tool_call` in hosted mode: through `/agents/dispatch` (no socket here)."""
        try:
            body = self._send(_control.dispatch_call(
                tool, arguments, agent_type=agent_type, instance_id=instance_id,
                deadline_ms=deadline_ms))
        except SvanticApiError as exc:
            raise _control.tool_error(exc) from None
        return _control.tool_value(body)

    def _heartbeats(self) -> None:
        import gevent

        while True:
            gevent.sleep(HEARTBEAT_INTERVAL)
            try:
                self._send(self._heartbeat())
            except Exception as exc:
                log.warning("%s: heartbeat failed: %s", self.settings.instance_id, exc)

    def _renewals(self) -> None:
        import gevent

        while True:
            grant = self._grant
            gevent.sleep(_control.renew_after(grant, time.time()) if grant else RETRY_RENEWAL)
            try:
                self._granted(self._exchange())
            except Exception as exc:
                log.warning("%s: token renewal failed: %s", self.settings.instance_id, exc)
                self._grant = None
                continue
            log.info("%s: token renewed", self.settings.instance_id)
            transport = self._transport
            if transport is not None and self._token is not None:
                self._after_refresh(transport.refresh_token(self._token))


def run_until_signal(agent: Agent, options: dict[str, Any]) -> None:
    """`Agent.run()`: connect, wait for Ctrl-C or SIGTERM, disconnect."""
    options = dict(options)
    adapter = options.get("adapter") or "asyncio"
    backend = options.pop("backend", "asyncio")
    if adapter == "gevent":
        import gevent.event

        connector = GeventMeshConnector(agent, **options)
        done = gevent.event.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(signum, done.set)
        connector.connect()
        agent.connector = connector  # type: ignore[assignment]
        try:
            done.wait()
        finally:
            connector.disconnect()
            agent.connector = None
        return
    if adapter == "anyio":
        import anyio

        async def main_anyio() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                connector = await agent.start(**options)
                try:
                    async for _ in signals:
                        break
                finally:
                    with anyio.CancelScope(shield=True):
                        await connector.disconnect()
                    agent.connector = None

        anyio.run(main_anyio, backend=backend)
        return
    import asyncio

    async def main_asyncio() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        connector = await agent.start(**options)
        try:
            await stop.wait()
        finally:
            await connector.disconnect()
            agent.connector = None

    asyncio.run(main_asyncio())
