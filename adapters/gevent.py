"""svantic.v1 over gevent: a blocking agent client and mesh server for greenlets.

Every protocol decision is the core's; this module moves bytes, keeps one hub
timer per connection at the core's `next_deadline()`, and runs each handler in
its own greenlet. It needs no monkey-patching: it uses `gevent.socket`,
`gevent.event` and hub timers explicitly, and does TLS over memory (`_tls.py`, as
the asyncio adapter does), so it works in a plain process and in any thread (each
thread has its own hub). If your application
monkey-patches, patch first: call `gevent.monkey.patch_all()` before importing
anything else, in particular before anything imports `ssl` (svantic_proto
imports PyJWT, which pulls in `ssl` and `socket`, lazily for this reason).

An `Agent` or `MeshServer` lives in the hub of the thread that called `start()`;
that thread must keep its hub running (`run()`, `serve_forever()`, any gevent
wait). Its blocking methods may be called from other threads: the call is handed
to the owning hub and the caller waits. `on_event` and `on_chunk` run in the
owning thread and must not block.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, cast

import gevent
import gevent.event
import gevent.monkey
import gevent.socket
import greenlet
from gevent.pool import Pool
from gevent.server import StreamServer

from svantic_proto import (
    AgentConnection,
    DispatchCancelled,
    DispatchReceived,
    Event,
    HandshakeRejected,
    LocalProtocolError,
    RetryDecision,
    SessionStarted,
)

from ._pump import Pump
from ._runtime import (
    AgentBase,
    AgentLinkBase,
    DispatchContext,
    MeshBase,
    handler_outcome,
)
from ._tls import TlsError, TlsSession

__all__ = ["Agent", "AgentLink", "HandshakeRejected", "MeshServer", "connect"]

READ_SIZE = 65536
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
    tls = TlsSession(context, server_side=server_hostname is None,
                     server_hostname=server_hostname)
    plaintext = b""
    try:
        tls.start()
        while True:
            ciphertext = tls.data_to_send()
            if ciphertext:
                sock.sendall(ciphertext)
            if tls.handshake_complete:
                return tls, plaintext
            data = sock.recv(READ_SIZE)
            if data:
                plaintext = tls.receive_data(data)
            else:
                tls.receive_eof()  # raises: a hang-up mid-handshake
    except TlsError:
        with contextlib.suppress(OSError):
            sock.sendall(tls.data_to_send())
        raise


def _kill(runner: greenlet.greenlet) -> None:
    """GreenletExit in a handler that is still running (never into a finished one: a throw
    into a dead greenlet lands in its parent)."""
    if runner:
        runner.throw(gevent.GreenletExit)


def _close(sock: Any) -> None:
    """Close at once; greenlets blocked on the socket wake with an error."""
    with contextlib.suppress(OSError):
        sock.close()


class _Timer:
    """One hub timer at a monotonic deadline; the callback runs in a fresh greenlet."""

    __slots__ = ("_callback", "_hub", "_watcher")

    def __init__(self, callback: Callable[[], object]) -> None:
        self._hub, self._callback = gevent.get_hub(), callback
        self._watcher: Any = None

    def arm(self, deadline: float | None) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if deadline is not None:
            self._watcher = self._hub.loop.timer(max(0.0, deadline - _now()))
            self._watcher.start(gevent.spawn, self._callback, update=True)


class _Link:
    """One socket, TLS over it when configured, and one core connection: a reader greenlet,
    one hub timer, and a writer greenlet only while the socket does not take a write.

    Writes go out at once from whichever greenlet made them, without waiting: what the
    socket does not take is queued, in order, for a writer greenlet to send when it can.
    So an answer costs no greenlet switch, the reader never blocks on a write (two peers
    both writing and neither reading cannot deadlock), and the queue is bounded.
    """

    __slots__ = ("_closing", "_hub", "_pending", "_plaintext", "_timer", "_tls", "_writer",
                 "done", "pump", "queued", "sock")

    def __init__(self, conn: Any, sock: Any, tls: TlsSession | None, plaintext: bytes,
                 on_event: Callable[[Event], None]) -> None:
        self._hub, self.sock, self._tls = gevent.get_hub(), sock, tls
        self._plaintext = plaintext  # what came with the TLS handshake's last flight
        self.pump = Pump(conn, on_event=on_event, write=self._write, close=self._close,
                         arm_timer=self._arm)
        self._pending: list[bytes] = []  # what the socket has not taken yet, in order
        self._writer: gevent.Greenlet | None = None  # while `_pending` is being sent
        self.queued, self._closing = 0, False
        self.done = gevent.event.Event()
        self._timer = _Timer(self._fire)

    def run(self) -> None:
        """Serve the connection in this greenlet until it ends (then `done` is set)."""
        self.pump.service()  # the upgrade request (agent) or the handshake timer (mesh)
        self._read_loop()

    def wait_flushed(self, timeout: float) -> None:
        """Until what is queued has gone out (or `timeout`): backpressure for a sender."""
        writer = self._writer
        if writer is not None:
            writer.join(timeout)

    def _write(self, chunks: list[bytes]) -> None:
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

    def _close(self) -> None:
        """The core closed: close_notify behind its close frame, then TCP once all is out."""
        self._closing = True
        self._timer.arm(None)
        tls = self._tls
        if tls is not None and not tls.close_sent and not tls.failed:
            tls.close()
            self._send(tls.data_to_send())
        if self._writer is None:
            _close(self.sock)

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
                _close(self.sock)

    def _read_loop(self) -> None:
        pump, tls = self.pump, self._tls
        try:
            if self._plaintext:
                pump.feed(self._plaintext, _now())
            self._plaintext = b""
            while not pump.closed:
                try:
                    data = self.sock.recv(READ_SIZE)
                except Exception:  # a reset, or a socket closed under us: EOF
                    data = b""
                if not data:
                    break
                if tls is not None:
                    try:
                        data = tls.receive_data(data)
                    finally:  # after a TlsError: the alert that says why
                        self._send(tls.data_to_send())
                if data and not pump.closed:
                    pump.feed(data, _now())
                if tls is not None and tls.peer_closed:  # close_notify: EOF, ours back
                    break
        except TlsError as exc:  # the peer's bytes are not TLS: as a reset
            log.debug("dropping the connection: %s", exc)
        finally:
            if not pump.closed:
                pump.eof(_now())
            self._close()
            writer = self._writer
            if writer is not None:
                writer.join(timeout=pump.conn.config.close_timeout)
                writer.kill(block=False)
            _close(self.sock)
            self.done.set()

    def _arm(self, deadline: float | None) -> None:
        self._timer.arm(None if self._closing else deadline)

    def _fire(self) -> None:
        if not self.pump.closed:
            self.pump.timer(_now())  # an early wake-up is harmless: the pump re-arms

    @_owned
    def abort(self) -> None:
        """Drop TCP at once, without a close frame, as a network fault would."""
        self._closing = True
        self._pending.clear()
        _close(self.sock)


class Agent(AgentBase[_Link, str]):
    """A connected-mode agent (spec 1, 3, 5): dials the mesh, runs handlers, reconnects.

    `start()` spawns the connection greenlet; `wait_ready(timeout)` returns once a
    welcome is seen; `run()` blocks until `stop()` or a final refusal (it raises the
    typed `HandshakeRejected`). Handlers are plain functions `(arguments, context)`,
    each in its own greenlet, killed (`GreenletExit`) when the dispatch is cancelled.
    """

    _clock = staticmethod(_now)

    def _init_adapter(self) -> None:
        self._cancel_reasons: dict[str, str] = {}
        self._hub: Any = None
        self._runner: gevent.Greenlet | None = None
        self._final_error: BaseException | None = None
        self._stop_event, self.ready = gevent.event.Event(), gevent.event.Event()
        self.last_session: SessionStarted | None = None

    def _connect_once(self) -> _Link:
        with gevent.Timeout(self.config.hello_timeout, TimeoutError):
            sock = gevent.socket.create_connection((self._host, self._port))
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls, plaintext = (_handshake(self._ssl, sock, server_hostname=self._host)
                                  if self._ssl is not None else (None, b""))
                conn = self._new_connection()
            except BaseException:
                _close(sock)
                raise
        self.ready.clear()
        self.link = _Link(conn, sock, tls, plaintext, self._on_event)
        gevent.spawn(self.link.run)
        return self.link

    def _cancel_handler(self, event: DispatchCancelled) -> None:
        running = self._handlers.get(event.dispatch_id)  # (greenlet, context)
        if running is not None:
            running[1].cancelled = True
            self._cancel_reasons[event.dispatch_id] = event.reason
            # Thrown from the hub, never here: this may run inside the handler's own greenlet
            # (its answer drained the pump), where a throw would cut the pump short.
            self._hub.loop.run_callback(_kill, running[0])

    def _session_started(self, event: SessionStarted) -> None:
        self.last_session = event
        self.ready.set()

    def _spawn_handler(self, handler: Callable[..., Any], event: DispatchReceived,
                       context: DispatchContext) -> None:
        """Start the handler in a greenlet of its own at once, as an eager task starts.

        A handler that answers without blocking (most do) runs to its end before this
        returns, so its answer goes out in the write of the read it came from: no hub pass,
        no writer wake-up of its own. The reader schedules its own resumption first, so a
        handler that does block hands the hub back and the reader carries on; the handler
        then finishes into the hub, as a spawned greenlet would.
        """
        current, hub = greenlet.getcurrent(), self._hub
        if current is hub:  # not a greenlet that may wait (the core's events come from
            gevent.spawn(self._spawn_handler, handler, event, context)  # the reader's)
            return
        runner = greenlet.greenlet(self._run_handler, parent=current)
        self._handlers[event.dispatch_id] = (runner, context)
        resume = hub.loop.run_callback(current.switch)
        runner.switch(handler, event, context)
        if runner.dead:  # it ended without blocking (or after, before the resumption ran)
            resume.stop()
        else:  # it blocked: the hub resumed us and is where it goes on and ends
            runner.parent = hub

    def _run_handler(self, handler: Callable[..., Any], event: DispatchReceived,
                     context: DispatchContext) -> None:
        self.handler_runs += 1
        dispatch_id = event.dispatch_id
        try:
            result = handler(event.arguments, context)
        except Exception as exc:  # a handler failure is the dispatch's failure, not ours
            self._answer(dispatch_id, "send_error", *handler_outcome(exc))
        except BaseException:  # GreenletExit: cancelled (spec 3), or the process is ending
            reason = self._cancel_reasons.pop(dispatch_id, None)
            if reason is not None:
                self._answer(dispatch_id, "send_cancelled")
            else:
                self._answer(dispatch_id, "send_error", "DISPATCH_FAILED", "handler gave no answer")
            raise
        else:
            self._answer(dispatch_id, "send_result", result)
        finally:
            self._handlers.pop(dispatch_id, None)
            self._cancel_reasons.pop(dispatch_id, None)

    refresh_token = _owned(AgentBase.refresh_token)

    def connections(self) -> Iterator[AgentConnection]:
        """Yield each established connection; reconnect by the core's backoff and retry (spec 5)."""
        while not self._stopping:
            retry: RetryDecision
            try:
                link = self._connect_once()
                gevent.wait([link.done, self.ready], count=1)
                if self.ready.is_set():
                    yield link.pump.conn
                link.done.wait()
                retry = self._retry_decision()
            except (TimeoutError, OSError):
                retry = RetryDecision.RETRY
            if self._stopping:
                return
            if provider := self._token_refresher(retry):
                self._use_fresh_token(provider())
            self._stop_event.wait(self.session.next_delay())  # stop() cuts the backoff short

    def _run_connections(self) -> None:
        try:
            for _ in self.connections():
                pass
        except Exception as exc:  # a final refusal, raised by run() and wait_ready()
            self._final_error = exc

    def start(self) -> Agent:
        """Spawn the connection greenlet in this thread's hub and return at once."""
        if self._runner is None:
            self._hub = gevent.get_hub()
            self._runner = gevent.spawn(self._run_connections)
        return self

    @_owned
    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a welcome is seen; raise the final refusal, or TimeoutError."""
        if self._runner is None:
            raise LocalProtocolError("call start() first")
        gevent.wait([self.ready, self._runner], timeout=timeout, count=1)
        if self.ready.is_set():
            return True
        if self._final_error is not None:
            raise self._final_error
        raise TimeoutError(f"agent {self.instance_id} not ready after {timeout} s")

    @_owned
    def run(self) -> None:
        """Keep the agent connected until `stop()`; raise a final refusal."""
        self.start()._runner.join()  # type: ignore[union-attr]
        if self._final_error is not None:
            raise self._final_error

    @_owned
    def stop(self, grace: float | None = None) -> None:
        """close_request (spec 3): finish in-flight work up to the grace, then close 1000."""
        self._stop_event.set()
        link = self._begin_stop(grace)
        if link is not None:
            wait = self.config.close_grace if grace is None else grace
            if not link.done.wait(wait + self.config.close_timeout + 1.0):
                link.abort()
        if self._runner is not None:
            self._runner.kill(timeout=self.config.close_timeout)  # ends a dial in progress
        if self.link is not None and self.link is not link:
            self.link.abort()  # a connection the dial opened while we were closing

    def __enter__(self) -> Agent:
        self.start().wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connect(url: str, **options: Any) -> Agent:
    """`with connect(url, ...) as agent:` (started and ready), or `agent.start()` yourself."""
    return Agent(url, **options)


class AgentLink(AgentLinkBase["MeshServer", _Link]):
    """The mesh's handle on one connected agent: send dispatches, block on their outcome."""

    def __init__(self, server: MeshServer, link: _Link) -> None:
        super().__init__(server, link)
        self._hub = link._hub

    @_owned
    def dispatch(self, capability: str, arguments: Mapping[str, Any] | None = None, *,
                 deadline_ms: int = 30_000,
                 on_chunk: Callable[[Any], object] | None = None) -> Any:
        """Send a dispatch and return its result; raise `DispatchError` on failure (spec 3)."""
        outcome = gevent.event.AsyncResult()
        dispatch_id = self._send_dispatch(capability, arguments, deadline_ms=deadline_ms,
                                          waiter=outcome, on_chunk=on_chunk, now=_now())
        if self.link.queued > WRITE_BUFFER_LIMIT // 4:
            self.link.wait_flushed(deadline_ms / 1000)  # backpressure, not memory growth
        try:
            return outcome.get()  # the core's deadline or the resume window ends every wait
        finally:
            self.server.waiters.discard(dispatch_id)


class MeshServer(MeshBase[AgentLink, _Link]):
    """A mesh endpoint serving `GET /agents/connect` over TLS (spec 1-5).

    `verify_token(token)` returns claims with `tenant_id` (and optionally `exp`,
    `sub`) or raises; `lookup_instance(id)` returns an `InstanceRecord` or None.
    `ssl_context` may be gevent's or the standard library's `SSLContext`.
    `on_event` gets every event, as on the other adapters (it runs in the owning hub).
    """

    _clock = staticmethod(_now)

    def _init_adapter(self) -> None:
        self._agents_changed, self._closed = gevent.event.Event(), gevent.event.Event()
        self._hub: Any = None
        self._server: StreamServer | None = None
        self._store_timer: _Timer | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen (large backlog, for reconnect storms) and accept in this thread's hub.

        Past `max_connections`, new connections wait in the backlog until one ends."""
        self._hub = gevent.get_hub()
        self._store_timer = _Timer(lambda: self._expire_store(_now()))
        self._server = StreamServer((host, port), self._serve, backlog=self.backlog,
                                    spawn=Pool(self.max_connections))
        self._server.start()
        address = self._server.socket.getsockname()
        return address[0], address[1]

    @_owned
    def serve_forever(self) -> None:
        """Block until `close()` has finished (keeps this thread's hub running)."""
        self._closed.wait()

    def _serve(self, sock: Any, address: object) -> None:
        link: _Link | None = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls, plaintext = None, b""
            if self._ssl is not None:
                with gevent.Timeout(self.config.hello_timeout, TimeoutError):
                    tls, plaintext = _handshake(self._ssl, sock)
            link = self._open_link(
                lambda conn, on_event: _Link(conn, sock, tls, plaintext, on_event))
            link.run()  # in this greenlet: no second one per connection
        except (OSError, TimeoutError):
            _close(sock)  # a failed TLS handshake: nothing reached the core yet
        finally:
            if link is not None:
                self.links.discard(link)

    def _new_agent_link(self, link: _Link) -> AgentLink:
        return AgentLink(self, link)

    def _agent_arrived(self) -> None:
        changed, self._agents_changed = self._agents_changed, gevent.event.Event()
        changed.set()  # wakes every current waiter; later ones wait on the fresh event

    @_owned
    def wait_for_agent(self, instance_id: str, timeout: float = 10.0) -> AgentLink:
        """The handle of `instance_id` once its session started; TimeoutError otherwise."""
        with gevent.Timeout(timeout, TimeoutError(f"{instance_id} did not connect in time")):
            while (agent := self.agents.get(instance_id)) is None:
                self._agents_changed.wait()
            return agent

    @_owned
    def dispatch(self, instance_id: str, capability: str,
                 arguments: Mapping[str, Any] | None = None, **options: Any) -> Any:
        return self._available_agent(instance_id).dispatch(capability, arguments, **options)

    def _arm_store_timer(self) -> None:
        if self._store_timer is not None:
            self._store_timer.arm(None if self._closed.is_set() else self.store.next_deadline())

    @_owned
    def close(self, grace: float | None = None) -> None:
        """Shutdown (spec 3, 4): close_request to every agent, wait the grace, 1001 the rest."""
        if self._server is not None:
            self._server.close()  # stop accepting; the connections drain below
        grace = self._request_close_all(grace)
        gevent.wait([link.done for link in self.links], timeout=grace + self.config.close_timeout)
        self._close_all()
        self._closed.set()
        self._arm_store_timer()  # stops it
        self.waiters.fail_all("AGENT_DISCONNECTED", "mesh shut down")
