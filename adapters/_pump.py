"""The one loop body every adapter runs after calling into a core connection.

After any call into the core (bytes in, a timer, a send from a handler),
the adapter must hand events to the application, write what the core wants
written (batched into one write), close the transport when told, and move its
single timer to the core's `next_deadline()`. `Pump` does exactly that and
nothing else; each adapter gives it three callables for its own I/O.

`conn` is anything with the core's five-step surface: a core connection (one
transport: `latch`, the pump is done once it closed the transport), or an
`AgentRuntime`, which outlives its transports (`latch=False`: each close marker
closes the current transport and the pump goes on).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from svantic_proto.events import Event

__all__ = ["DETACHED", "Pump"]


class Pump:
    __slots__ = (
        "_arm_timer",
        "_busy",
        "_close",
        "_deadline",
        "_latch",
        "_on_event",
        "_write",
        "closed",
        "conn",
    )

    def __init__(
        self,
        conn: Any,
        *,
        on_event: Callable[[Event], None],
        write: Callable[[list[bytes]], None],
        close: Callable[[], None],
        arm_timer: Callable[[float | None], None],
        latch: bool = True,
    ) -> None:
        self.conn = conn
        self._latch = latch
        self._on_event = on_event
        self._write = write
        self._close = close
        self._arm_timer = arm_timer
        self._deadline: float | None = None
        self._busy = False
        self.closed = False

    def switch(self, conn: Any, on_event: Callable[[Any], None]) -> None:
        """Feed `conn` from now on and hand its events to `on_event` (a transport that
        turned out to carry plain HTTP); takes effect inside a `service()` in progress."""
        self.conn, self._on_event = conn, on_event

    def feed(self, data: bytes, now: float) -> None:
        self.conn.receive_data(data, now)
        self.service()

    def eof(self, now: float) -> None:
        self.conn.receive_eof(now)
        self.service()

    def timer(self, now: float) -> None:
        self._deadline = None
        self.conn.handle_timer(now)
        self.service()

    def service(self) -> None:
        """Drain events and output; safe to call from inside an event callback."""
        if self._busy:
            return  # the outer call loops until nothing is left
        self._busy = True
        try:
            while True:
                conn = self.conn  # read each round: an event may `switch` the connection
                events = conn.events_received()
                for event in events:
                    self._on_event(event)
                chunks = conn.data_to_send()
                if chunks:
                    if chunks[-1] == b"":
                        data = [c for c in chunks if c]
                        if data and not self.closed:
                            self._write(data)
                        if not self.closed:
                            self.closed = self._latch
                            self._close()
                    elif not self.closed:
                        self._write(chunks)
                if not events and not chunks:
                    break
            deadline = None if self.closed else self.conn.next_deadline()
            if deadline != self._deadline:
                self._deadline = deadline
                self._arm_timer(deadline)
        finally:
            self._busy = False


def _ignore(*_: object) -> None:
    pass


DETACHED = Pump(None, on_event=_ignore, write=_ignore, close=_ignore, arm_timer=_ignore)
DETACHED.closed = True
"""The pump of a transport with no core connection (yet, or any more): takes nothing."""
