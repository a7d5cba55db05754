"""svantic.v1 over gevent: a blocking agent client and mesh server for greenlets.

Every protocol decision is the core's (an agent's, across its connections, is its
runtime's: `svantic_proto.agent_runtime`; a mesh's, across its connections, is its
`svantic_proto.mesh_runtime`); this module moves bytes, keeps one hub timer per mesh and
one per agent at the `next_deadline()` it is given, and runs each handler in its own
greenlet. A reader that keeps finding data waiting gives the hub a turn every `FAIR_SHARE`
bytes, so one flooding peer cannot stall the other connections. It needs no
monkey-patching: it uses `gevent.socket`, `gevent.event` and hub timers explicitly, and
does TLS over memory (`_tls.py`, as the asyncio adapter does), so it works in a plain
process and in any thread (each thread has its own hub). If your application
monkey-patches, patch first: call `gevent.monkey.patch_all()` before importing anything
else, in particular before anything imports `ssl` (svantic_proto imports PyJWT, which
pulls in `ssl` and `socket`, lazily for this reason).

An `Agent` or `MeshServer` lives in the hub of the thread that called `start()`;
that thread must keep its hub running (`run()`, `serve_forever()`, any gevent
wait). Its blocking methods may be called from other threads: the call is handed
to the owning hub and the caller waits. `on_event` and `on_chunk` run in the
owning thread and must not block.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import gevent
import gevent.event
import gevent.monkey
import gevent.socket
import greenlet
from gevent.server import StreamServer

from svantic_proto.agent_runtime import Dial, StartHandler
from svantic_proto.errors import HandshakeRejected, LocalProtocolError
from svantic_proto.frames import SessionContext
from svantic_proto.mesh_runtime import AdmissionNeeded

from ._agent import AgentDriver
from ._mesh import AgentHandle, MeshDriver
from ._pump import DETACHED
from ._tls import TlsError, TlsSession

__all__ = ["Agent", "AgentLink", "HandshakeRejected", "MeshServer", "connect"]

READ_SIZE = 65536
FAIR_SHARE = READ_SIZE
"""Bytes a reader takes in a row before it waits for the hub's next loop iteration. A socket
that always has data waiting never blocks, so without this one peer that floods would stall
every other connection in the hub; with it, each busy connection gets one read per pass."""
WRITE_BUFFER_LIMIT = 4 * 1024 * 1024
"""Bytes queued for a peer that does not read before we give up on it (slow reader)."""

Method = TypeVar("Method", bound=Callable[..., Any])
log = logging.getLogger(__name__)
_now = time.monotonic
_thread_ident: Callable[[], int] = gevent.monkey.get_original("_thread", "get_ident")


def _owned(method: Method) -> Method:
    """Make a blocking method callable from any thread: it runs in the owning hub's thread
    (gevent objects belong to one hub) while the caller waits."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        hub = self._hub
        if hub is None or hub.thread_ident == _thread_ident():
            return method(self, *args, **kwargs)
        outcome = gevent.event.AsyncResult()

        def run() -> None:
            try:
                outcome.set(method(self, *args, **kwargs))
            except BaseException as exc:  # handed back to the calling thread
                outcome.set_exception(exc)

        hub.loop.run_callback_threadsafe(gevent.spawn, run)
        while not outcome.ready():
            outcome.wait(1.0)  # the timeout keeps the caller's own hub loop alive
        return outcome.get()

    return cast(Method, call)


def _handshake(context: ssl.SSLContext, sock: Any,
               server_hostname: str | None = None) -> tuple[TlsSession, bytes]:
    """The TLS handshake over a plain socket (`_tls.TlsSession`, as the asyncio adapter
    does), within the caller's timeout. Returns the session and any plaintext that came
    with the handshake's last flight. Raises `TlsError` (an OSError), after sending the
    alert that says why."""
    tls = TlsSession(context, server_side=server_hostname is None, server_hostname=server_hostname)
    plaintext = b""
    try:
        tls.start()
        while True:
            if ciphertext := tls.data_to_send():
                sock.sendall(ciphertext)
            if tls.handshake_complete:
                return tls, plaintext
            if data := sock.recv(READ_SIZE):
                plaintext = tls.receive_data(data)
            else:
                tls.receive_eof()  # raises: a hang-up mid-handshake
    except TlsError:
        with contextlib.suppress(OSError):
            sock.sendall(tls.data_to_send())
        raise


def _kill(runner: greenlet.greenlet | None) -> None:
    """GreenletExit in a handler that is still running (never into a finished one: a throw
    into a dead greenlet lands in its parent; nor into none)."""
    if runner:
        runner.throw(gevent.GreenletExit)


def _close(sock: Any) -> None:
    """Close at once; greenlets blocked on the socket wake with an error."""
    with contextlib.suppress(OSError):
        sock.close()


def _reuse_port_listener(host: str, port: int, backlog: int) -> Any:
    """A listening gevent socket with SO_REUSEPORT set before the bind (the option only
    shares a port between sockets that all set it before binding)."""
    infos = gevent.socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = gevent.socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class _Timer:
    """One timer at a monotonic deadline in the calling thread's hub; the callback runs in a
    fresh greenlet."""

    __slots__ = ("_callback", "_watcher")
    _watcher: Any

    def __init__(self, callback: Callable[[], object]) -> None:
        self._callback, self._watcher = callback, None

    def arm(self, deadline: float | None) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if deadline is not None:
            self._watcher = gevent.get_hub().loop.timer(max(0.0, deadline - _now()))
            self._watcher.start(gevent.spawn, self._callback, update=True)


class _Link:
    """One socket, TLS over it when configured, and the pump it feeds: a reader greenlet
    (`run`), and a writer greenlet only while the socket does not take a write.

    `pump` is the mesh's pump of this link's core connection (its timer is the mesh's one
    timer), or the agent's runtime while this is its transport, or `DETACHED`: each read
    goes to whatever it is at that moment. Writes go out at once from whichever greenlet
    made them, without waiting: what the socket does not take is queued, in order, for a
    writer greenlet to send when it can. So an answer costs no greenlet switch, the reader never
    blocks on a write (two peers both writing and neither reading cannot deadlock), and the
    queue is bounded.
    """

    __slots__ = ("_close_timeout", "_closer", "_closing", "_hub", "_pending", "_plaintext",
                 "_tls", "_writer", "done", "pump", "queued", "sock")

    def __init__(self, sock: Any, tls: TlsSession | None, plaintext: bytes,
                 close_timeout: float) -> None:
        self._hub, self.sock, self._tls = gevent.get_hub(), sock, tls
        self._plaintext = plaintext  # what came with the TLS handshake's last flight
        self._close_timeout, self.pump = close_timeout, DETACHED
        self._pending: list[bytes] = []  # what the socket has not taken yet, in order
        self._writer: gevent.Greenlet | None = None  # while `_pending` is being sent
        self.queued, self._closing = 0, False
        self.done = gevent.event.Event()

    def run(self) -> None:
        """Serve the connection in this greenlet until it ends (then `done` is set).

        Past `FAIR_SHARE` bytes read since its last turn, the reader lets the loop poll
        every other connection first."""
        tls, data, self._plaintext, taken, eof = self._tls, self._plaintext, b"", 0, False
        try:
            while not self.pump.closed:
                if data:
                    self.pump.feed(data, _now())
                if eof := (tls is not None and tls.peer_closed):  # close_notify: ours back
                    break
                if taken >= FAIR_SHARE:
                    taken = 0
                    gevent.sleep(1e-6)  # above 0: resumed in the loop's next iteration
                try:
                    data = self.sock.recv(READ_SIZE)
                except Exception:  # a reset, or a socket closed under us: EOF
                    data = b""
                if eof := not data:
                    break
                taken += len(data)
                if tls is not None:
                    try:
                        data = tls.receive_data(data)
                    finally:  # after a TlsError: the alert that says why
                        self._send(tls.data_to_send())
        except TlsError as exc:  # the peer's bytes are not TLS: as a reset
            log.debug("dropping the connection: %s", exc)
        finally:
            if not self.pump.closed:
                self.pump.eof(_now())
            self.close()
            if self._writer is not None:  # the rest of what is queued, for a while
                self._writer.join(timeout=self._close_timeout)
            if not eof:
                self._linger()
            _close(self.sock)  # and a writer still blocked on it fails
            self.done.set()

    def _linger(self) -> None:
        """We closed first: read and drop what the peer still sends, until its EOF or for
        `close_timeout`. Closing a socket with unread bytes sends a TCP reset, which can
        destroy our close frame (say 1009 for a frame refused from its header) on its way."""
        with contextlib.suppress(OSError), gevent.Timeout(self._close_timeout, False):
            while self.sock.recv(READ_SIZE):  # drain, drop
                pass

    def wait_flushed(self, timeout: float) -> None:
        """Until what is queued has gone out (or `timeout`): backpressure for a sender."""
        if self._writer is not None:
            self._writer.join(timeout)

    def write(self, chunks: list[bytes]) -> None:
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        tls = self._tls
        if tls is not None:
            if tls.close_sent:
                return
            tls.send(data)
            data = tls.data_to_send()
        self._send(data)

    def _send(self, data: bytes) -> None:
        """Never blocks, so any greenlet or the hub may call it."""
        if not data:
            return
        if self._writer is None:  # nothing queued ahead of it: try the socket now
            try:
                sent = self.sock.send(data, 0, timeout=0.0)
            except BlockingIOError:
                sent = 0
            except OSError:  # a broken socket ends the transport: the reader reports it
                self.abort()
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._writer = gevent.spawn(self._write_loop)
        self._pending.append(data)
        self.queued += len(data)
        if self.queued > WRITE_BUFFER_LIMIT:
            self.abort()  # the peer stopped reading: do not grow memory without limit

    def close(self) -> None:
        """Closed by the core: close_notify behind what is queued, then TCP once all is out."""
        self._closing = True
        tls = self._tls
        if tls is not None and not tls.close_sent and not tls.failed:
            tls.close()
            self._send(tls.data_to_send())
        if self._writer is None:
            self._half_close()

    def _half_close(self) -> None:
        """All is out: our FIN, while the reader drains the peer's rest (`_linger`); the
        socket goes `close_timeout` from now at the latest."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self._closer = self._hub.loop.timer(self._close_timeout)
        self._closer.start(_close, self.sock)

    def _write_loop(self) -> None:
        try:
            while self._pending:
                data = b"".join(self._pending)  # one batched write per pass
                self._pending.clear()
                self.sock.sendall(data)
                self.queued -= len(data)
        except Exception:  # any write failure ends the transport: the reader reports it
            self.abort()
        finally:
            self._writer = None
            if self._closing:
                self._half_close()

    @_owned
    def abort(self) -> None:
        """Drop TCP at once, without a close frame, as a network fault would."""
        self._closing = True
        self._pending.clear()
        _close(self.sock)


class Agent(AgentDriver[str]):
    """A connected-mode agent (spec 1, 3, 5): dials the mesh, runs handlers, reconnects.

    `start()` begins in this thread's hub and returns at once; `wait_ready(timeout)` returns
    once a welcome is seen; `run()` blocks until `stop()` or a final refusal (it raises the
    typed `HandshakeRejected`). `ready` is set while a session is up. Handlers are plain
    functions `(arguments, context)`, each in its own greenlet, killed (`GreenletExit`) when
    the dispatch is cancelled. The decisions are the runtime's (`svantic_proto.agent_runtime`):
    this class dials, moves bytes, runs handlers and keeps one hub timer.
    """

    _now = staticmethod(_now)

    def _setup(self) -> None:
        self.ready, self._finished = gevent.event.Event(), gevent.event.AsyncResult()
        self._hub: Any = None  # the hub that owns the agent, from `start()`
        self._handlers: dict[str, greenlet.greenlet] = {}
        self._dialling: gevent.Greenlet | None = None
        self._timer = _Timer(self._fire)
        self.runtime.tool_caller = self._call_tool

    def _call_tool(self, tool: str, arguments: Any = None, **options: Any) -> Any:
        """`DispatchContext.call_tool` here: send the tool call, block for its result."""
        outcome = gevent.event.AsyncResult()
        call_id = self.runtime.call_tool(tool, arguments, waiter=outcome, **options)
        try:
            return outcome.get()
        finally:
            self.runtime.forget_tool_call(call_id)

    # -- the runtime's actions -------------------------------------------------------------

    def _arm(self, deadline: float | None) -> None:
        self._timer.arm(deadline)

    def _dial(self, dial: Dial) -> None:
        self._dialling = gevent.spawn(self._connect, dial)

    def _connect(self, dial: Dial) -> None:
        """TCP, then TLS (`wss://`, spec 1), then serve the transport in this greenlet. No
        timeout of its own: at the runtime's dial deadline `_cancel_dial` kills it."""
        sock = None
        try:
            sock = gevent.socket.create_connection((dial.host, dial.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls, plaintext = (_handshake(self._ssl, sock, server_hostname=dial.host)
                              if self._ssl is not None else (None, b""))
        except BaseException as exc:
            if sock is not None:
                _close(sock)
            if not isinstance(exc, Exception):
                raise  # GreenletExit: the dial was abandoned
            self._dial_failed(dial.attempt, exc)
            return
        link = _Link(sock, tls, plaintext, self.config.close_timeout)
        if self._opened(dial.attempt, link):
            self._dialling = None  # it is the transport's reader now: no dial to cancel
            link.run()

    def _cancel_dial(self) -> None:
        dialling, self._dialling = self._dialling, None
        if dialling is not None:
            dialling.kill(block=False)

    def _start_handler(self, start: StartHandler) -> None:
        """Start the handler in a greenlet of its own at once, as an eager task starts.

        A handler that answers without blocking (most do) runs to its end before this
        returns, so its answer goes out in the write of the read it came from: no hub pass,
        no writer wake-up of its own. The reader schedules its own resumption first, so a
        handler that does block hands the hub back and the reader carries on; the handler
        then finishes into the hub, as a spawned greenlet would.
        """
        current, hub = greenlet.getcurrent(), self._hub
        if current is hub:  # not a greenlet that may wait: start from one that may
            gevent.spawn(self._start_handler, start)
            return
        runner = greenlet.greenlet(self._run_handler, parent=current)
        self._handlers[start.dispatch_id] = runner
        resume = hub.loop.run_callback(current.switch)
        runner.switch(start)
        if runner.dead:  # it ended without blocking (or after, before the resumption ran)
            resume.stop()
        else:  # it blocked: the hub resumed us and is where it goes on and ends
            runner.parent = hub

    def _run_handler(self, start: StartHandler) -> None:
        dispatch_id = start.dispatch_id
        try:
            result = start.handler(start.arguments, start.context)
        except Exception as exc:  # a handler failure is the dispatch's failure, not ours
            self._raised(dispatch_id, exc)
        except BaseException:  # GreenletExit: ours (CancelHandler) or anyone's; the runtime
            self._cancelled(dispatch_id)  # tells them apart
            raise
        else:
            self._returned(dispatch_id, result)
        finally:
            self._handlers.pop(dispatch_id, None)

    def _cancel_handler(self, dispatch_id: str) -> None:
        # Thrown from the hub, never here: this may run inside the handler's own greenlet
        # (its answer drained the pump), where a throw would cut the pump short.
        self._hub.loop.run_callback(_kill, self._handlers.get(dispatch_id))

    def _fetch_token(self, provider: Callable[[], str]) -> None:
        def fetch() -> None:
            try:
                token: str | None = provider()
            except Exception:
                log.exception("%s: the token provider failed", self.instance_id)
                token = None
            self._token_fetched(token)

        gevent.spawn(fetch)

    def _ready_changed(self, ready: bool) -> None:
        (self.ready.set if ready else self.ready.clear)()

    def _stopped(self, error: BaseException | None) -> None:
        self.ready.clear()  # also after a transport dropped without a close
        if error is None:
            self._finished.set(None)
        else:
            self._finished.set_exception(error)

    # -- the API ---------------------------------------------------------------------------

    refresh_token = _owned(AgentDriver.refresh_token)

    def start(self) -> Agent:
        """Begin in this thread's hub (it owns the agent from now on) and return at once."""
        if self._hub is None:
            self._hub = gevent.get_hub()
            self.runtime.start(self._now())
            self.pump.service()
        return self

    @_owned
    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a welcome is seen; raise the final refusal, or TimeoutError."""
        if self._hub is None:
            raise LocalProtocolError("call start() first")
        gevent.wait([self.ready, self._finished], timeout=timeout, count=1)
        if self.ready.is_set():
            return True
        if self._finished.ready():
            self._finished.get()  # raises the final refusal
        raise TimeoutError(f"agent {self.instance_id} not ready after {timeout} s")

    @_owned
    def run(self) -> None:
        """Keep the agent connected until `stop()`; raise a final refusal (spec 5)."""
        self.start()._finished.get()

    @_owned
    def stop(self, grace: float | None = None) -> None:
        """close_request (spec 3): finish in-flight work up to the grace, then close 1000; at
        once while dialling or backing off. Returns once the agent has stopped (at the latest
        after the grace and `Config.close_timeout`)."""
        self.runtime.stop(self._now(), grace)
        self.pump.service()
        self._finished.wait()

    def __enter__(self) -> Agent:
        self.start().wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


connect = Agent
"""`with connect(url, ...) as agent:` (started and ready), or `agent.start()` yourself."""


class AgentLink(AgentHandle[_Link]):
    """The mesh's handle on one connected agent: send dispatches, block on their outcome."""

    __slots__ = ()

    def dispatch(self, capability: str, arguments: Mapping[str, Any] | None = None, *,
                 deadline_ms: int = 30_000, on_chunk: Callable[[Any], object] | None = None,
                 task_id: str | None = None,
                 session_context: SessionContext | None = None) -> Any:
        """Send a dispatch to this agent's instance and return its result; raise
        `DispatchError` on failure (spec 3)."""
        return self.server.dispatch(
            self.instance_id, capability, arguments, deadline_ms=deadline_ms,
            on_chunk=on_chunk, task_id=task_id, session_context=session_context)


class MeshServer(MeshDriver[_Link]):
    """A mesh endpoint serving `GET /agents/connect` over TLS (spec 1-5).

    `verify_token(token)` returns claims with `tenant_id` (and optionally `exp`,
    `sub`) or raises; `lookup_instance(id)` returns an `InstanceRecord` or None: both plain
    (blocking) functions, each upgrade's run in a greenlet of its own.
    `ssl_context` may be gevent's or the standard library's `SSLContext`.
    `on_event` gets every event, as on the other adapters (it runs in the owning hub).
    The decisions are the runtime's (`svantic_proto.mesh_runtime`): this class accepts,
    does TLS, moves bytes and keeps one hub timer for the whole mesh.
    """

    _now = staticmethod(_now)

    def _setup(self) -> None:
        self._hub: Any = None  # the hub that owns the mesh, from `start()`
        self._server: StreamServer | None = None
        self._arrived, self._shut = gevent.event.Event(), gevent.event.Event()
        self._finished = gevent.event.Event()
        self._timer = _Timer(self._fire)

    # -- the runtime's actions -------------------------------------------------------------

    def _arm(self, deadline: float | None) -> None:
        self._timer.arm(deadline)

    def _new_handle(self, link: _Link) -> AgentLink:
        return AgentLink(self, link)

    def _admit(self, action: AdmissionNeeded[Any]) -> None:
        """In a greenlet of its own: the lookups may block (a database, a key fetch), and
        whoever performs the action (a reader, the mesh's one timer) must not wait for them."""
        gevent.spawn(MeshDriver._admit, self, action)

    def _admit_async(self, action: AdmissionNeeded[Any], claims: Any, record: Any) -> None:
        """A coroutine lookup has no loop to run on here: answered 503, as an outage."""
        for value in (claims, record):
            if inspect.iscoroutine(value):
                value.close()
        error = OSError("the gevent mesh needs plain verify_token and lookup_instance")
        self._admitted(action, error, error)

    def _agent_arrived(self) -> None:
        arrived, self._arrived = self._arrived, gevent.event.Event()
        arrived.set()  # wakes every current waiter; later ones wait on the fresh event

    def _shutdown_complete(self) -> None:
        self._shut.set()

    # -- transports ------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0, *,
              reuse_port: bool = False) -> tuple[str, int]:
        """Listen (large backlog, for reconnect storms) and accept in this thread's hub.

        Every connection is accepted: handshakes are bounded by `max_handshakes` (the
        oldest go) and `Config.hello_timeout`, sessions by `max_connections` (503).
        `reuse_port=True` (SO_REUSEPORT, set before the bind) lets several mesh processes
        listen on one port, the kernel spreading new connections among them."""
        self._hub = gevent.get_hub()
        if reuse_port:
            self._server = StreamServer(_reuse_port_listener(host, port, self.backlog),
                                        self._serve)
        else:
            self._server = StreamServer((host, port), self._serve, backlog=self.backlog)
        self._server.start()
        address = self._server.socket.getsockname()
        return address[0], address[1]

    def _serve(self, sock: Any, address: object) -> None:
        """One accepted TCP connection, in its greenlet: TLS, then its reader."""
        link = _Link(sock, None, b"", self.config.close_timeout)
        if not self._accepted(link):  # the mesh is closing, or too many handshakes
            _close(sock)
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:  # within hello_timeout: the runtime drops the link
                link._tls, link._plaintext = _handshake(self._ssl, sock)
        except OSError:  # a failed TLS handshake: nothing reached the core
            _close(sock)
        else:
            self._opened(link)
            link.run()  # in this greenlet: no second one per connection
        finally:
            self._closed(link)
            link.done.set()

    # -- the API ---------------------------------------------------------------------------

    @_owned
    def serve_forever(self) -> None:
        """Block until `close()` has finished (keeps this thread's hub running)."""
        self._finished.wait()

    @_owned
    def wait_for_agent(self, instance_id: str, timeout: float = 10.0) -> AgentLink:
        """The handle of `instance_id` once its session started; TimeoutError otherwise."""
        with gevent.Timeout(timeout, TimeoutError(f"{instance_id} did not connect in time")):
            while (agent := self.agents.get(instance_id)) is None:
                self._arrived.wait()
            return cast(AgentLink, agent)

    @_owned
    def dispatch(self, instance_id: str, capability: str,
                 arguments: Mapping[str, Any] | None = None, *, deadline_ms: int = 30_000,
                 on_chunk: Callable[[Any], object] | None = None, task_id: str | None = None,
                 session_context: SessionContext | None = None,
                 dispatch_id: str | None = None) -> Any:
        """Send a dispatch and return its result; raise `DispatchError` on failure (spec 3)."""
        outcome = gevent.event.AsyncResult()
        dispatch_id, link = self._send(instance_id, capability, arguments,
                                       deadline_ms=deadline_ms, waiter=outcome,
                                       on_chunk=on_chunk, task_id=task_id,
                                       session_context=session_context, dispatch_id=dispatch_id)
        try:
            if link.queued > WRITE_BUFFER_LIMIT // 4:
                link.wait_flushed(deadline_ms / 1000)  # backpressure, not memory growth
            return outcome.get()  # the core's deadline or the resume window ends every wait
        finally:
            self.runtime.discard(dispatch_id)

    def _run_http(self, request: Any, responder: Any) -> None:
        gevent.spawn(self._http_sync, request, responder)

    @_owned
    def close(self, grace: float | None = None) -> None:
        """Shutdown (spec 3, 4): close_request to every agent, wait the grace, 1001 the rest."""
        if self._server is not None:
            self._server.close()  # stop accepting; the runtime drains the connections
        self._begin_close(grace)
        self._shut.wait()
        self._arm(None)
        gevent.wait([link.done for link in self.links], timeout=self.config.close_timeout)
        self._finished.set()
