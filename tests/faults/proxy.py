"""A fault-injecting TCP proxy on 127.0.0.1, for the fault tests (issue 17).

`tc netem` is not available on the test machines, so faults are made here, one TCP hop
between a client and its upstream: every accepted connection is a `Link` that copies bytes
both ways, and the test decides per link (or for every new one) what goes wrong:

* `reset()`: both sockets closed with `SO_LINGER` 0, so each peer gets an RST, no FIN;
* `blackhole()`: nothing more is forwarded either way and nothing is closed (a half-open
  path: the peers only notice by their own timers);
* `delay`: each chunk waits this long before it is forwarded;
* `trickle`: at most N bytes per interval are forwarded;
* `cut_after(n)`: exactly `n` more bytes are forwarded in that direction, then the link is
  reset (a cut at a chosen byte offset).

The proxy runs an asyncio loop in a thread of its own, so sync tests, asyncio tests and gevent
code call its control API alike (every call is carried to that loop and waited for). It reads
at most `CHUNK` bytes at a time and writes with flow control, so a link buffers a bounded
number of bytes whatever the peers do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

__all__ = ["Fault", "FaultProxy", "Link"]

CHUNK = 64 * 1024
"""Bytes read at once per direction; with the writers' flow control, what one link holds."""
WAIT = 10.0
"""Seconds a control call waits for the proxy's loop."""

Direction = Literal["up", "down"]
"""`up`: client -> upstream; `down`: upstream -> client."""
T = TypeVar("T")


@dataclass
class Fault:
    """What happens to the bytes of one link (or, as `FaultProxy.default`, of every new one)."""

    delay: float = 0.0
    """Seconds each chunk waits before it is forwarded."""
    trickle: tuple[int, float] | None = None
    """`(n, interval)`: forward at most `n` bytes, then wait `interval`, and so on."""
    blackhole: bool = False
    """Forward nothing and close nothing (a half-open path)."""
    cut_after: dict[str, int] = field(default_factory=dict)
    """Direction -> bytes still to forward in that direction before the link is reset."""


class Link:
    """One proxied connection: client side, upstream side and its fault."""

    def __init__(self, proxy: FaultProxy, number: int, fault: Fault) -> None:
        self.proxy = proxy
        self.number = number
        self.fault = fault
        self.sent: dict[str, int] = {"up": 0, "down": 0}
        """Bytes forwarded per direction."""
        self.closed = asyncio.Event()
        self.opened = time.monotonic()
        self.how: str | None = None
        """How it ended: `reset`, `eof` (a peer closed), `refused` (no upstream)."""
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        return f"Link({self.number}, sent={self.sent}, how={self.how})"

    # -- the control API (any thread) ------------------------------------------------------

    def reset(self) -> None:
        """Close both sides with an RST now."""
        self.proxy._call(self._reset)

    def blackhole(self) -> None:
        """Stop forwarding both ways; both sockets stay open."""
        self.proxy._call(lambda: setattr(self.fault, "blackhole", True))

    def cut_after(self, n: int, direction: Direction = "down") -> None:
        """Forward `n` more bytes in `direction`, then reset."""
        def arm() -> None:
            self.fault.cut_after[direction] = n
            if n == 0:
                self._reset()
        self.proxy._call(arm)

    @property
    def live(self) -> bool:
        return self.how is None

    # -- in the proxy's loop ---------------------------------------------------------------

    def _reset(self) -> None:
        if self.how is not None:
            return
        self.how = "reset"
        self.proxy.resets += 1
        for writer in self._writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._finish()

    def _eof(self) -> None:
        if self.how is not None:
            return
        self.how = "eof"
        for writer in self._writers:
            writer.transport.close()
        self._finish()

    def _finish(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self.closed.set()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: Direction) -> None:
        fault = self.fault
        try:
            while self.how is None:
                data = await reader.read(CHUNK)
                if not data:
                    if not fault.blackhole:  # a FIN passes on, unless the path is dead
                        self._eof()
                    return
                if fault.blackhole:
                    continue  # read and dropped: the sender sees no back-pressure either
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                await self._forward(data, writer, direction)
        except (ConnectionError, OSError):
            self._eof()
        except asyncio.CancelledError:
            pass

    async def _forward(self, data: bytes, writer: asyncio.StreamWriter,
                       direction: Direction) -> None:
        fault = self.fault
        left = fault.cut_after.get(direction)
        cut = left is not None and left <= len(data)
        if left is not None:
            data = data[:left]
            fault.cut_after[direction] = left - len(data)
        step = fault.trickle[0] if fault.trickle else len(data) or 1
        for start in range(0, len(data), step):
            if self.how is not None or fault.blackhole:
                return
            piece = data[start:start + step]
            # Counted before the write: the peer (another thread) may read it at once.
            self.sent[direction] += len(piece)
            writer.write(piece)
            await writer.drain()
            if fault.trickle and start + step < len(data):
                await asyncio.sleep(fault.trickle[1])
        if cut:
            self._reset()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 that forwards to `upstream` and injects faults.

    `start()` returns the port it listens on; `upstream` may be set (or changed) later, say
    when the upstream's port is known only once it started behind the proxy's address. New
    links take a copy of `default`. Use as a context manager, or call `stop()`."""

    def __init__(self, upstream: tuple[str, int] | None = None, *, port: int = 0,
                 default: Fault | None = None) -> None:
        self.upstream = upstream
        self.default = default or Fault()
        self.next_fault: Fault | None = None
        """When set, the next accepted link takes this fault (once) instead of `default`'s:
        a fault aimed at a reconnect, with no race against the one after it."""
        self.links: list[Link] = []
        """Every link accepted so far, in order (`live_links()` for the open ones)."""
        self.resets = 0
        self.refused = 0
        """Links closed at once because the upstream could not be reached."""
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._accepted = threading.Condition()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> int:
        """Listen (in a thread of its own); returns the port."""
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen(ready))
                loop.run_forever()
            except BaseException as exc:  # handed to start()'s caller
                if not ready.done():
                    ready.set_exception(exc)
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        self.port = ready.result(WAIT)
        return self.port

    async def _listen(self, ready: concurrent.futures.Future[int]) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                  backlog=4096, reuse_address=True)
        ready.set_result(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Reset every live link and stop listening."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self.links):
                link._reset()
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        self._loop = self._thread = None

    # -- the control API -----------------------------------------------------------------

    def live_links(self) -> list[Link]:
        return self._call(lambda: [link for link in self.links if link.how is None])

    def wait_links(self, count: int, timeout: float = WAIT) -> list[Link]:
        """Wait until at least `count` links are live; returns them (TimeoutError else)."""
        deadline = time.monotonic() + timeout
        with self._accepted:
            while True:
                live = [link for link in self.links if link.how is None]
                if len(live) >= count:
                    return live
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(live)} live links, not {count}, in {timeout} s")
                self._accepted.wait(left)

    def reset_random(self, rng: random.Random, *, min_age: float = 0.0) -> Link | None:
        """Reset one live link picked by `rng`, among those open for `min_age` seconds at
        least (None when there is none)."""
        def pick() -> Link | None:
            oldest = time.monotonic() - min_age
            live = [link for link in self.links if link.how is None and link.opened <= oldest]
            if not live:
                return None
            link = rng.choice(live)
            link._reset()
            return link
        return self._call(pick)

    def reset_all(self) -> int:
        """Reset every live link; returns how many there were."""
        def all_() -> int:
            live = [link for link in self.links if link.how is None]
            for link in live:
                link._reset()
            return len(live)
        return self._call(all_)

    def _call(self, function: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the proxy is not running")
        if threading.current_thread() is self._thread:
            return function()

        async def run() -> T:
            return function()
        return asyncio.run_coroutine_threadsafe(run(), loop).result(WAIT)

    # -- in the loop -----------------------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        given, self.next_fault = self.next_fault or self.default, None
        fault = Fault(given.delay, given.trickle, given.blackhole, dict(given.cut_after))
        link = Link(self, len(self.links), fault)
        link._writers.append(client_writer)
        self.links.append(link)
        upstream = self.upstream
        try:
            if upstream is None:
                raise ConnectionRefusedError("no upstream yet")
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*upstream), WAIT)
        except (OSError, TimeoutError):
            self.refused += 1
            link._eof()
            link.how = "refused"
            return
        link._writers.append(up_writer)
        if link.how is not None:  # reset while it dialled
            up_writer.transport.abort()
            return
        link._tasks = [
            asyncio.ensure_future(link._pump(client_reader, up_writer, "up")),
            asyncio.ensure_future(link._pump(up_reader, client_writer, "down")),
        ]
        with self._accepted:
            self._accepted.notify_all()
        await link.closed.wait()
