"""The mesh's Prometheus metrics for `GET /metrics` (spec 6).

Every label has a small fixed set of values: transport is `ws` or `callback`, outcome is
`ok` or one of the known error codes (anything else is `other`). No label names an instance,
tenant or capability, because each distinct value is a time series kept forever by the mesh
and by every scraper: a fleet of short-lived instances would otherwise grow memory without
end. Per-instance health is what `/agents/get_connection` and the events are for.

Each `MeshMetrics` has its own `CollectorRegistry` unless one is given, never the process
global one, so two meshes in one process (tests, embedding) neither collide on names nor
mix their numbers.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["KNOWN_CODES", "TRANSPORTS", "MeshMetrics", "outcome_label"]

TRANSPORTS: Final = ("ws", "callback")
KNOWN_CODES: Final = frozenset({
    "DISPATCH_FAILED",
    "CAPABILITY_NOT_FOUND",
    "INVALID_ARGUMENTS",
    "DISPATCH_AUTH_FAILED",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "AGENT_DISCONNECTED",
    "AGENT_UNAVAILABLE",
    "AGENT_UNHEALTHY",
    "BAD_FRAME",
    "RATE_LIMITED",
    "INTERNAL",
    "TOOL_DEPTH_EXCEEDED",
})
"""The codes spec 3 and 6 name for a dispatch or tool call's end; an agent may send any
string, so only these become label values."""

_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
"""Dispatch round trips: a millisecond (loopback) up to the default 30 s deadline and past."""
_ROUTING_BUCKETS: Final = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2,
)
"""A routing decision is an in-memory pick: microseconds, so the buckets start at 1 µs."""
_LAG_BUCKETS: Final = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0)
_HOP_BUCKETS: Final = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5)


def outcome_label(code: str | None) -> str:
    """`ok` for success (None or "ok"), a known code lowercased, else `other`."""
    if code is None or code.lower() == "ok":
        return "ok"
    upper = code.upper()
    return upper.lower() if upper in KNOWN_CODES else "other"


def _transport(transport: str) -> str:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
    return transport


class MeshMetrics:
    """The counters, gauges and histograms of one mesh, and their text exposition."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self._dispatches = Counter(
            "svantic_dispatches_total", "Dispatches that ended, by transport and outcome.",
            ("transport", "outcome"), registry=r,
        )
        self._open_websockets = Gauge(
            "svantic_open_websockets", "Agent WebSocket connections open now.", registry=r,
        )
        self._dispatch_latency = Histogram(
            "svantic_dispatch_latency_seconds",
            "Time from sending a dispatch to its terminal frame or failure.",
            ("transport",), buckets=_LATENCY_BUCKETS, registry=r,
        )
        self._routing_latency = Histogram(
            "svantic_routing_latency_seconds",
            "Time the mesh spends choosing an instance for one dispatch.",
            buckets=_ROUTING_BUCKETS, registry=r,
        )
        self._loop_lag = Gauge(
            "svantic_event_loop_lag_seconds",
            "Last measured delay of the mesh's event loop behind its schedule.", registry=r,
        )
        self._loop_lag_hist = Histogram(
            "svantic_event_loop_lag_distribution_seconds",
            "Measured delays of the mesh's event loop behind its schedule.",
            buckets=_LAG_BUCKETS, registry=r,
        )
        self._orphans = Counter(
            "svantic_orphan_terminal_frames_total",
            "Terminal frames for a dispatch the mesh no longer holds (ignored).", registry=r,
        )
        self._tool_calls = Counter(
            "svantic_tool_calls_total", "Agent tool calls that ended, by outcome.",
            ("outcome",), registry=r,
        )
        self._hop_latency = Histogram(
            "svantic_interprocess_routing_seconds",
            "Scale-out: what carrying a dispatch to the mesh process holding the agent's "
            "socket and its outcome back adds, beyond that process's own time.",
            buckets=_HOP_BUCKETS, registry=r,
        )
        # The labelled children by label values: `.labels()` checks and looks them up under
        # a lock on every call, and a dispatch ends thousands of times a second. The keys
        # are label values, a small fixed set (see the module doc), so these stay small.
        self._finished: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._tool_children: dict[str, Counter] = {}
        # Zero series up front, so a dashboard sees `0`, not "no data", before any traffic.
        for transport in TRANSPORTS:
            self._finished_children(transport, "ok")
        self._tool_child("ok")

    def dispatch_finished(self, transport: str, outcome: str | None, seconds: float) -> None:
        """One dispatch ended: `outcome` is None or "ok" on success, else its error code."""
        label = "ok" if outcome is None else outcome_label(outcome)
        children = self._finished.get((transport, label))
        if children is None:
            children = self._finished_children(transport, label)
        count, latency = children
        count.inc()
        latency.observe(max(0.0, seconds))

    def _finished_children(self, transport: str, label: str) -> tuple[Counter, Histogram]:
        t = _transport(transport)  # checked before it becomes a key: the keys stay bounded
        children = (self._dispatches.labels(t, label), self._dispatch_latency.labels(t))
        self._finished[(t, label)] = children
        return children

    def _tool_child(self, label: str) -> Counter:
        child = self._tool_children.get(label)
        if child is None:
            child = self._tool_children[label] = self._tool_calls.labels(label)
        return child

    def routing_decision(self, seconds: float) -> None:
        self._routing_latency.observe(max(0.0, seconds))

    def websocket_opened(self) -> None:
        self._open_websockets.inc()

    def websocket_closed(self) -> None:
        self._open_websockets.dec()

    def loop_lag(self, seconds: float) -> None:
        lag = max(0.0, seconds)
        self._loop_lag.set(lag)
        self._loop_lag_hist.observe(lag)

    def orphan_terminal(self) -> None:
        self._orphans.inc()

    def interprocess_hop(self, seconds: float) -> None:
        """One dispatch carried to another mesh process and back (scale-out)."""
        self._hop_latency.observe(max(0.0, seconds))

    def tool_call(self, outcome: str | None) -> None:
        """One tool call answered: None or "ok" on success, else its error code."""
        self._tool_child(outcome_label(outcome)).inc()

    def render(self) -> tuple[str, bytes]:
        """The `Content-Type` and body of a `GET /metrics` answer."""
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)
