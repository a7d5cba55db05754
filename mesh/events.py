"""Lifecycle events (seed 001 "Health Events", seed 004 `registration_flagged`) and their
Server-Sent Events encoding for `GET /events`.

Pure: no I/O, no clock. The serving code owns the HTTP stream; this module decides what goes
on it. Each `publish` is encoded to bytes once and the same bytes are queued on every
subscriber of that tenant, so a hundred dashboards cost one encoding, not a hundred.

Memory is bounded twice: a bus holds at most `max_subscribers` subscriptions, and each
subscription queues at most `max_bytes`. A subscriber that falls behind is cut (its queue
stops growing, `overflowed` turns true and it is woken one last time) rather than slowing the
publisher or growing without end; SSE clients reconnect by themselves, so cutting one costs it
a reconnect, not correctness of the mesh.

Single-threaded by design: the bus lives on the mesh's event loop, and `notify` is how the
loop's writer learns there is something to send.
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "AGENT_CONNECTED",
    "AGENT_DEREGISTERED",
    "AGENT_DISCONNECTED",
    "AGENT_HEALTH_CHANGED",
    "AGENT_REGISTERED",
    "EVENT_KINDS",
    "KEEPALIVE",
    "REGISTRATION_FLAGGED",
    "EventBus",
    "Subscription",
    "TooManySubscribers",
    "rfc3339",
    "sse",
]

log = logging.getLogger("svantic.mesh.events")

AGENT_REGISTERED: Final = "agent.registered"
AGENT_CONNECTED: Final = "agent.connected"
AGENT_DISCONNECTED: Final = "agent.disconnected"
AGENT_HEALTH_CHANGED: Final = "agent.health_changed"
AGENT_DEREGISTERED: Final = "agent.deregistered"
REGISTRATION_FLAGGED: Final = "registration_flagged"
EVENT_KINDS: Final = (
    AGENT_REGISTERED,
    AGENT_CONNECTED,
    AGENT_DISCONNECTED,
    AGENT_HEALTH_CHANGED,
    AGENT_DEREGISTERED,
    REGISTRATION_FLAGGED,
)
"""The kinds seed 001 and seed 004 name; `/events` carries these and nothing else."""

KEEPALIVE: Final = b": keepalive\n\n"
"""An SSE comment: ignored by clients, but it keeps proxies from closing an idle stream and
lets the server notice a client that went away."""


def rfc3339(wall: float) -> str:
    """Epoch seconds as RFC 3339 UTC with milliseconds (`2025-01-02T03:04:05.678Z`): the
    one timestamp shape the control plane and the events use, so clients parse one format."""
    stamp = datetime.fromtimestamp(wall, tz=UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
_RESERVED: Final = frozenset({"type", "tenant_id", "at"})


def _field(name: str, value: str) -> str:
    # A line break in `id:` or `event:` would start a new field (or end the event), letting
    # a value inject events; such a value is a bug in the caller, not something to escape.
    if "\n" in value or "\r" in value:
        raise ValueError(f"an SSE {name} cannot contain a line break")
    return f"{name}: {value}\n"


def sse(event: str | None, data: Any, *, id: str | None = None) -> bytes:
    """One Server-Sent Event: optional `id:` and `event:` lines, `data` as compact JSON, and
    the blank line that ends the event.

    JSON escapes line breaks inside strings, but the encoding is still split on any line
    break and each piece sent as its own `data:` line (the SSE way to carry several lines),
    so no value can ever end the event early. Raises ValueError for NaN or infinity (not
    JSON) and for a line break in `event` or `id`.
    """
    out: list[str] = []
    if id is not None:
        out.append(_field("id", id))
    if event is not None:
        out.append(_field("event", event))
    # ASCII-only JSON: U+2028/U+2029 and U+0085 stay escaped, so the split below (on the
    # three breaks SSE itself knows) never cuts inside a string a client would rejoin.
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    out.extend(f"data: {line}\n" for line in _LINE_BREAK.split(text))
    out.append("\n")
    return "".join(out).encode("utf-8")


class TooManySubscribers(Exception):
    """The bus already serves `max_subscribers` streams; the serving code answers 503 so a
    flood of `/events` connections cannot exhaust the mesh's memory."""


class Subscription:
    """One `/events` stream's queue of encoded events for one tenant.

    The serving code calls `drain()` when `notify` wakes it, writes what it got, and ends the
    stream once `overflowed` (the client reconnects) or when the client goes away (`close()`).
    """

    __slots__ = ("_bus", "_closed", "_max_bytes", "_notify", "_overflowed", "_pending",
                 "_queue", "tenant_id")

    def __init__(
        self,
        bus: EventBus,
        tenant_id: str,
        notify: Callable[[], None] | None,
        max_bytes: int,
    ) -> None:
        self._bus: EventBus | None = bus
        self.tenant_id = tenant_id
        self._notify = notify
        self._max_bytes = max_bytes
        self._queue: deque[bytes] = deque()
        self._pending = 0
        self._overflowed = False
        self._closed = False

    @property
    def pending_bytes(self) -> int:
        """Bytes queued and not yet drained."""
        return self._pending

    @property
    def overflowed(self) -> bool:
        """True once the queue would have gone over `max_bytes`: this subscriber missed
        events, so its stream must end (a gap would be silent otherwise)."""
        return self._overflowed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def notify(self) -> Callable[[], None] | None:
        """Called after each event is queued: the serving code sets it to wake its writer
        (it may be set after `subscribe`, once the writer exists)."""
        return self._notify

    @notify.setter
    def notify(self, value: Callable[[], None] | None) -> None:
        self._notify = value

    def drain(self) -> list[bytes]:
        """The queued events, oldest first; the queue is empty afterwards."""
        items = list(self._queue)
        self._queue.clear()
        self._pending = 0
        return items

    def close(self) -> None:
        """Unsubscribe and drop the queue; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._pending = 0
        self._detach()

    def _detach(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            bus._remove(self)

    def _offer(self, item: bytes) -> None:
        if self._closed or self._overflowed:
            return
        if self._pending + len(item) > self._max_bytes:
            # Cut, not dropped-and-continued: a stream with a silent gap would mislead its
            # client, whereas an ended one makes it reconnect and re-read current state.
            self._overflowed = True
            self._detach()
            log.warning(
                "an /events subscriber of tenant %s fell %d bytes behind; ending its stream",
                self.tenant_id, self._pending,
            )
        else:
            self._queue.append(item)
            self._pending += len(item)
        self._wake()

    def _wake(self) -> None:
        if self._notify is None:
            return
        try:
            self._notify()
        except Exception:
            # One broken writer must not keep the other subscribers from their events.
            log.exception("an /events subscriber's notify failed")


class EventBus:
    """Fan-out of lifecycle events to the `/events` subscribers of each tenant.

    Events never cross tenants: a subscription names its tenant and only that tenant's
    publishes reach it. Ids are one sequence per bus, so a client can tell from the `id:`
    lines that it saw events in the order they were published.
    """

    def __init__(self, *, max_subscribers: int = 256) -> None:
        if max_subscribers < 1:
            raise ValueError("max_subscribers must be at least 1")
        self._max_subscribers = max_subscribers
        self._by_tenant: dict[str, dict[int, Subscription]] = {}
        self._count = 0
        self._seq = 0

    @property
    def subscriber_count(self) -> int:
        return self._count

    def subscribe(
        self,
        tenant_id: str,
        *,
        notify: Callable[[], None] | None = None,
        max_bytes: int = 256 * 1024,
    ) -> Subscription:
        """A new stream for `tenant_id`'s events from now on; raises `TooManySubscribers`
        when the bus is full."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._count >= self._max_subscribers:
            raise TooManySubscribers(
                f"the mesh already serves {self._max_subscribers} event streams"
            )
        sub = Subscription(self, tenant_id, notify, max_bytes)
        self._by_tenant.setdefault(tenant_id, {})[id(sub)] = sub
        self._count += 1
        return sub

    def publish(self, kind: str, tenant_id: str, data: Mapping[str, Any], wall: float) -> None:
        """Encode one event (`type`, `tenant_id`, `at` and `data`'s fields) and queue it on
        every subscriber of `tenant_id`, in publish order."""
        if not _RESERVED.isdisjoint(data):
            # `tenant_id` above all: a payload must not relabel whose event this is.
            raise ValueError(f"event data cannot set {sorted(_RESERVED & data.keys())}")
        self._seq += 1
        subs = self._by_tenant.get(tenant_id)
        if not subs:
            return  # nobody listens: skip the encoding, the id is still used up
        body = {"type": kind, "tenant_id": tenant_id, "at": rfc3339(wall), **data}
        item = sse(kind, body, id=str(self._seq))
        # A snapshot: a notify may close its own (or another) subscription while we loop.
        for sub in tuple(subs.values()):
            sub._offer(item)

    def _remove(self, sub: Subscription) -> None:
        subs = self._by_tenant.get(sub.tenant_id)
        if subs is None or subs.pop(id(sub), None) is None:
            return
        self._count -= 1
        if not subs:
            del self._by_tenant[sub.tenant_id]
