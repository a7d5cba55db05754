"""The asyncio transport two adapters share: `svantic_adapters.asyncio`, and
`svantic_adapters.anyio` on the asyncio backend.

A connection is an `asyncio.Protocol` on a plain TCP transport, with TLS over
`ssl.MemoryBIO`s (`_tls.py`), feeding whatever pump the agent or mesh driver gave it. The
one timer of an agent or a mesh is a `LoopTimer`; handlers run as `_tasks.py` starts them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from svantic_proto import Config
from svantic_proto.agent_runtime import Dial
from svantic_proto.frames import SessionContext

from ._pump import DETACHED
from ._tls import TlsError, TlsSession

__all__ = ["WRITE_BUFFER_LIMIT", "AsyncioMeshApi", "Dialling", "LoopTimer", "ProtocolLink", "dial",
           "dispatch", "listen"]

WRITE_BUFFER_LIMIT = 4 * 1024 * 1024
"""Bytes queued for a peer that does not read before we give up on it (slow reader)."""

log = logging.getLogger(__name__)
T = TypeVar("T")
OpenCallback = Callable[["ProtocolLink", BaseException | None], None]
"""Told once the transport is ready (TLS handshake done), or why it never will be."""


READ_BUFFER_BYTES = 64 * 1024
"""What one socket read may bring. Shared by every link of a thread (see `_read_buffer`)."""

_reads = threading.local()


def _read_buffer() -> memoryview:
    """The thread's one read buffer. asyncio reads into it (`get_buffer`, `recv_into`) and
    hands it straight back (`buffer_updated`) before any other callback runs, and a loop runs
    in one thread, so one buffer serves every link of the thread. A plain `Protocol` would
    make asyncio allocate a fresh 256 KiB `bytes` per read, which glibc maps and unmaps each
    time (an mmap and a munmap per read: about 13 µs of a loopback round trip per side)."""
    view: memoryview | None = getattr(_reads, "view", None)
    if view is None:
        view = _reads.view = memoryview(bytearray(READ_BUFFER_BYTES))
    return view


class ProtocolLink(asyncio.BufferedProtocol):
    """One TCP transport, TLS over it when configured, and one core connection.

    A protocol, not streams and a reader task: bytes go from `buffer_updated` straight into
    the core's pump, and each pump pass is one `transport.write`. Reads land in a buffer
    shared by the thread's links (`_read_buffer`): ciphertext is copied into OpenSSL's
    memory BIO, plaintext into a `bytes` for the pump. TLS is `_tls.TlsSession`
    over the plain transport (asyncio's TLS transport keeps 256 KiB per connection). The
    core connection is attached once the transport is ready: `on_open` does it, as the
    streams' callbacks did after the TLS handshake. `done` is set when the link ended:
    the core closed it or the transport was lost.
    """

    __slots__ = ("_config", "_done", "_ended", "_on_done", "_on_made", "_on_open", "_timer", "_tls",
                 "_writable", "loop", "pump", "transport")

    def __init__(self, tls: TlsSession | None, config: Config, on_open: OpenCallback,
                 on_done: Callable[[ProtocolLink], None] | None = None,
                 on_made: Callable[[ProtocolLink], bool] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.pump = DETACHED
        self.transport: asyncio.Transport | None = None
        self._tls, self._config, self._on_done = tls, config, on_done
        self._on_made = on_made  # the mesh's admission of a fresh transport
        self._on_open: OpenCallback | None = on_open  # dropped once open
        self._timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Event | None = None  # made when first awaited: idle links need none
        self._writable: asyncio.Future[None] | None = None  # while the transport is paused
        self._ended = False

    # -- the link's own API --------------------------------------------------------------

    @property
    def done(self) -> asyncio.Event:
        """Set once the link has ended."""
        if self._done is None:
            self._done = asyncio.Event()
            if self._ended:
                self._done.set()
        return self._done

    def write(self, chunks: list[bytes]) -> None:
        self._write(chunks)

    def close(self) -> None:
        self._close()

    def abort(self) -> None:
        """Drop TCP at once, without a close frame, as a network fault would."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def paused(self) -> bool:
        """The transport asked us to stop writing (its buffer is over the high-water mark)."""
        return self._writable is not None

    async def drain(self, limit: int) -> None:
        """Over `limit` bytes queued, wait until the transport is below its low-water mark."""
        transport, writable = self.transport, self._writable
        if (writable is not None and transport is not None
                and transport.get_write_buffer_size() > limit):
            await asyncio.shield(writable)  # shared by every caller: not cancelled by one

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self._on_made is not None and not self._on_made(self):
            self._on_open = None
            self.transport.abort()
            return
        if self._tls is None:
            self._opened()
        else:  # spec 4: a peer that never finishes the TLS handshake is dropped
            self._timer = self.loop.call_later(self._config.hello_timeout, self._fail,
                                               TimeoutError("TLS handshake timed out"))
            self._tls_step(self._tls.start)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        view = _read_buffer()[:nbytes]
        self.data_received(view if self._tls is not None else bytes(view))

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes read (plaintext for the pump must be `bytes`: only TLS gets the view)."""
        tls = self._tls
        if tls is not None:
            plaintext = None if tls.closed else self._tls_step(tls.receive_data, data)
            if plaintext is None:
                return
            data = plaintext
            if self._on_open is not None:
                if not tls.handshake_complete:
                    return
                self._opened()
        if data and not self.pump.closed:
            self.pump.feed(cast(bytes, data), self.loop.time())
        if tls is not None and tls.peer_closed:  # close_notify: EOF, then ours back
            self.eof_received()
            self._close()

    def eof_received(self) -> bool:
        tls = self._tls
        if tls is not None and not (tls.peer_closed or tls.failed):
            self._tls_step(tls.receive_eof)  # a TlsError during the handshake
        if not self.pump.closed:
            self.pump.eof(self.loop.time())
        return False  # close our side too (after what is queued), as the streams did

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._tls = None  # OpenSSL's state goes now, not when the last reference does
        if self._on_open is not None:
            self._fail(exc or ConnectionResetError("connection closed before it was ready"))
        if not self.pump.closed:
            self.pump.eof(self.loop.time())
        self._end()
        self.resume_writing()

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # -- inside --------------------------------------------------------------------------

    def _opened(self) -> None:
        self._cancel_timer()
        on_open, self._on_open = self._on_open, None
        if on_open is not None:
            on_open(self, None)

    def _fail(self, error: BaseException) -> None:
        """The transport never became ready (TLS refused, handshake timeout), or TLS broke:
        after a `TlsError` close once OpenSSL's alert is out, else drop at once."""
        log.debug("dropping the connection: %s", error)
        on_open, self._on_open = self._on_open, None
        if on_open is not None:
            on_open(self, error)
        if isinstance(error, TlsError) and self.transport is not None:
            self.transport.close()
        else:
            self.abort()

    def _tls_step(self, step: Callable[..., T], *args: Any) -> T | None:
        """One TLS call, then write the ciphertext it produced; None after a `TlsError`."""
        tls = cast(TlsSession, self._tls)
        result: T | None = None
        failure = None
        try:
            result = step(*args)
        except TlsError as exc:
            failure = exc
        ciphertext = tls.data_to_send()  # after a failure: the alert that says why
        if ciphertext:
            cast(asyncio.Transport, self.transport).write(ciphertext)
        if failure is not None:
            self._fail(failure)
        return result

    def _write(self, chunks: list[bytes]) -> None:
        transport = cast(asyncio.Transport, self.transport)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        tls = self._tls
        if tls is None:
            transport.write(data)  # one write per pump pass
        elif not tls.close_sent:
            tls.send(data)
            transport.write(tls.data_to_send())
        if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.abort()  # the peer stopped reading: do not grow memory without limit

    def _close(self) -> None:
        """The core closed: TLS close_notify (without TLS, our FIN), then close TCP once the
        peer's came or after `close_timeout` (spec 4: a dead peer is dropped, not awaited).
        Meanwhile what the peer still sends is read and dropped: closing with unread bytes
        sends a TCP reset, which can destroy our close frame on its way."""
        self._cancel_timer()
        transport, tls = cast(asyncio.Transport, self.transport), self._tls
        if tls is not None and not transport.is_closing():
            self._tls_step(tls.close)
        if tls is None and transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()
            self._timer = self.loop.call_later(self._config.close_timeout, self.abort)
        elif tls is None or tls.closed:
            transport.close()
        elif not transport.is_closing():
            self._timer = self.loop.call_later(self._config.close_timeout, self.abort)
        self._end()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            if self._done is not None:
                self._done.set()
            if self._on_done is not None:
                self._on_done(self)


LinkT = TypeVar("LinkT", bound=ProtocolLink)


class LoopTimer:
    """The one timer of an agent or a mesh on the running loop: `_arm` moves it, and it
    calls `_fire` (the driver base's) when it passes."""

    _timer: asyncio.TimerHandle | None = None
    _fire: Callable[[], None]  # the driver base's

    def _arm(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._fire)


class AsyncioMeshApi:
    """What the asyncio mesh and the ASGI mesh offer alike: wait for an agent, dispatch."""

    agents: Mapping[str, Any]
    _arrived: asyncio.Event  # made by the driver's `_setup`
    _http_tasks: set[asyncio.Task[None]]  # made by the driver's `_setup`

    def _agent_arrived(self) -> None:
        arrived, self._arrived = self._arrived, asyncio.Event()
        arrived.set()

    async def wait_for_agent(self, instance_id: str, timeout: float = 10.0) -> Any:
        """The handle of `instance_id` once its session started; TimeoutError otherwise."""
        async with asyncio.timeout(timeout):
            while (agent := self.agents.get(instance_id)) is None:
                await self._arrived.wait()
        return agent

    async def dispatch(self, instance_id: str, capability: str,
                       arguments: Mapping[str, Any] | None = None, *,
                       deadline_ms: int = 30_000,
                       on_chunk: Callable[[Any], object] | None = None,
                       task_id: str | None = None,
                       session_context: SessionContext | None = None,
                       dispatch_id: str | None = None) -> Any:
        """Send a dispatch and return its result; raise `DispatchError` on failure.
        `dispatch_id`: an id of the caller's (a canonical UUID), e.g. to log it first."""
        return await dispatch(self, instance_id, capability, arguments, deadline_ms=deadline_ms,
                              on_chunk=on_chunk, task_id=task_id,
                              session_context=session_context, dispatch_id=dispatch_id)

    def _run_http(self, request: Any, responder: Any) -> None:
        task = asyncio.get_running_loop().create_task(
            self._http_async(request, responder))  # type: ignore[attr-defined]
        self._http_tasks.add(task)
        task.add_done_callback(self._http_tasks.discard)


class Dialling:
    """A dial under way. `cancel()` stops it, and drops a transport that is open but not
    yet handed to the agent (its TLS handshake under way)."""

    __slots__ = ("link", "task")

    def __init__(self) -> None:
        self.link: ProtocolLink | None = None
        self.task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.link is not None:
            self.link.abort()
            self.link = None


def dial(agent: Any, dial: Dial, link_class: Callable[..., LinkT]) -> Dialling:
    """Open the transport of `dial` for an `AgentDriver`: TCP, then TLS (`wss://`, spec 1);
    the runtime's deadline bounds both (its `AbortTransport` cancels the dial)."""
    loop = asyncio.get_running_loop()
    dialling = Dialling()

    def on_open(link: Any, error: BaseException | None) -> None:
        dialling.link = None  # handed over (or failed): no longer the dial's to drop
        if error is not None:
            agent._dial_failed(dial.attempt, error)
        else:
            agent._opened(dial.attempt, link)

    def new_link() -> LinkT:
        link = link_class(tls, agent.config, on_open)
        dialling.link = link
        return link

    tls = (TlsSession(agent._ssl, server_side=False, server_hostname=dial.host)
           if agent._ssl is not None else None)

    async def connect() -> None:
        try:
            await loop.create_connection(new_link, dial.host, dial.port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, name resolution, ...: the runtime decides
            agent._dial_failed(dial.attempt, exc)

    dialling.task = loop.create_task(connect())
    return dialling


async def listen(server: Any, link_class: Callable[..., ProtocolLink], host: str, port: int,
                 *, reuse_port: bool = False) -> tuple[asyncio.Server, tuple[str, int]]:
    """Listen on plain TCP (a large backlog, for reconnect storms) for a `MeshDriver`;
    TLS is each link's. `reuse_port` sets SO_REUSEPORT, so several processes can listen on
    one port and the kernel spreads the new connections among them."""

    def opened(link: ProtocolLink, error: BaseException | None) -> None:
        if error is None:  # a failed TLS handshake never reaches the core
            server._opened(link)

    def new_link() -> ProtocolLink:
        tls = TlsSession(server._ssl, server_side=True) if server._ssl is not None else None
        return link_class(tls, server.config, opened, server._closed, server._accepted)

    listener = await asyncio.get_running_loop().create_server(
        new_link, host, port, backlog=server.backlog, reuse_port=reuse_port)
    address = listener.sockets[0].getsockname()
    return listener, (address[0], address[1])


async def dispatch(server: Any, instance_id: str, capability: str,
                   arguments: Mapping[str, Any] | None, *, deadline_ms: int,
                   on_chunk: Callable[[Any], object] | None, task_id: str | None,
                   session_context: Any, dispatch_id: str | None = None) -> Any:
    """Send a dispatch through a `MeshDriver` and await its outcome (a future)."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    dispatch_id, link = server._send(instance_id, capability, arguments,
                                     deadline_ms=deadline_ms, waiter=future, on_chunk=on_chunk,
                                     task_id=task_id, session_context=session_context,
                                     dispatch_id=dispatch_id)
    try:
        if link.paused:  # backpressure, not memory growth
            await link.drain(WRITE_BUFFER_LIMIT // 4)
        return await future
    finally:
        server.runtime.discard(dispatch_id)
