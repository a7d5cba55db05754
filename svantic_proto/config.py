"""Every interval, timeout and limit of a connection, with the spec's defaults (section 4)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import LocalProtocolError

__all__ = ["Config"]


@dataclass(frozen=True, slots=True)
class Config:
    """One object for every knob; times in seconds, sizes in bytes.

    Defaults are the spec's (section 4) where it gives one; the rest are
    decided here and documented in docs/protocol-decisions.md. Tests shrink
    the times to run fast with a fake clock.
    """

    # liveness (spec section 4)
    ws_ping_interval: float = 30.0
    """How often the mesh sends a WebSocket ping (spec 4: 30 s): keeps NATs and proxies from
    dropping an idle socket, and makes a dead peer's silence measurable."""
    app_ping_interval: float = 30.0
    """How often the mesh sends an app-level `ping` frame (spec 4: 30 s): proves the peer's
    protocol layer, not only its WebSocket stack, still answers."""
    app_ping_offset: float = 15.0
    """Delay of the first app `ping` after the session starts (spec 4: 15 s), so app and
    WebSocket pings interleave instead of bursting together."""
    heartbeat_interval: float = 30.0
    """How often an agent sends `heartbeat` (spec 4: 30 s); the mesh announces its own value in
    `welcome.heartbeat_interval_ms`, which the agent follows. Bounds how stale the mesh's view
    of an agent's load gets."""
    dead_peer_timeout: float = 75.0
    """Silence (nothing at all received) after which a peer is taken for dead (spec 4: 75 s):
    the mesh closes 1001, the agent drops the socket and reconnects. Bounds how long a
    half-open connection holds its dispatches."""
    hello_timeout: float = 10.0
    """How long opening a session may take (spec 4: 10 s). The mesh waits this long for the
    upgrade request, then again for `hello` after its 101; the agent waits this long from
    sending its upgrade request for `welcome`. Bounds what a peer that connects and then says
    nothing costs."""
    close_grace: float = 30.0
    """Default `close_request.grace_seconds` (spec 4: 30 s): how long in-flight work may run
    before the side that asked for the close closes 1000 anyway."""
    close_timeout: float = 5.0
    """After our close frame, how long to wait for the peer's before dropping the transport."""
    # reconnect and resume (spec section 5)
    reconnect_base_delay: float = 1.0
    """First reconnect backoff delay (spec 5: 1 s), doubled per failed attempt, with jitter:
    a mesh restart does not get every agent back at once."""
    reconnect_max_delay: float = 30.0
    """Cap of the reconnect backoff delay (spec 5: 30 s): bounds how long an agent stays away
    once the mesh is back."""
    resume_window: float = 30.0
    """How long the mesh holds a disconnected agent's in-flight dispatches for a resume
    (spec 5: 30 s, never past a dispatch's deadline): bounds the memory and the wait that a
    vanished agent costs before its dispatches fail `AGENT_DISCONNECTED`."""
    agent_deadline_margin: float = 1.0
    """The agent tells a handler to stop this long after a dispatch's deadline, so the mesh's
    own timeout (and its `cancel`) normally comes first and the caller sees DEADLINE_EXCEEDED."""
    outbox_limit: int = 1000
    """Frames an agent queues while disconnected (spec 5: bounded); when full the oldest chunk
    goes first. Bounds the memory an outage costs an agent whose handlers keep streaming."""
    finished_cache_size: int = 10_000
    """Finished dispatches whose terminal answer an agent keeps, to answer a re-delivered
    dispatch again instead of running it twice (spec 5); bounds that cache's memory."""
    # WebSocket limits (spec section 4)
    max_message_bytes: int = 1 << 20
    """Largest WebSocket message accepted (spec 4: 1 MiB, else close 1009), announced in
    `hello`/`welcome`: bounds the memory one message can take before it is parsed."""
    max_fragments: int = 1024
    """Most fragments one WebSocket message may arrive in (spec 4: 1024, else close 1009):
    bounds the per-fragment work a peer can force with tiny fragments."""
    max_handshake_bytes: int = 16 * 1024
    """Largest HTTP upgrade request head the mesh reads (16 KiB, else 431): bounds what a
    client can make the mesh buffer before it is authenticated."""
    # inbound limits answered with RATE_LIMITED (spec section 3, error codes)
    max_frames_per_second: float = 10_000.0
    """Refill rate of the inbound token bucket for frames that ask for work (`dispatch`,
    `tool_call`, `ping`, `heartbeat`, `token_refresh`); over it they get `RATE_LIMITED`.
    Bounds the work one peer can make us do; replies are never refused."""
    frame_burst: int = 10_000
    """Capacity of that token bucket: how many work-asking frames may arrive at once."""
    max_in_flight: int = 1000
    """Dispatches an agent runs at once, and tool calls a mesh serves at once per connection."""
    rate_limit_retry_after: float = 1.0
    """The `retry_after_ms` hint sent with `RATE_LIMITED` (or the token bucket's own wait when
    that is longer), so a refused peer backs off instead of retrying in a tight loop."""
    max_pending_chunks: int = 1024
    """Out-of-order chunks buffered per dispatch while waiting for a gap to fill (beyond:
    `BAD_FRAME` + 1002). Bounds the count; `max_pending_chunk_bytes` bounds their size."""
    max_pending_chunk_bytes: int = 4 << 20
    """Bytes of out-of-order chunk data (JSON-encoded) buffered per dispatch while waiting for
    a gap to fill (4 MiB; beyond: `BAD_FRAME` + 1002, as for `max_pending_chunks`). Without it
    1,024 near-1 MiB chunks that skip one `seq` would hold about 1 GiB for one dispatch."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) not in (int, float) or value < 0:
                raise LocalProtocolError(
                    f"Config.{field.name} must be a number >= 0, not {value!r}"
                )
        for name in ("max_message_bytes", "max_fragments", "frame_burst", "max_in_flight"):
            if getattr(self, name) < 1:
                raise LocalProtocolError(f"Config.{name} must be at least 1")
        # Periodic timers re-arm at `now + interval`: zero would fire forever at one instant,
        # and a zero refill rate would make the RATE_LIMITED hint infinite.
        for name in ("ws_ping_interval", "app_ping_interval", "max_frames_per_second"):
            if getattr(self, name) <= 0:
                raise LocalProtocolError(f"Config.{name} must be greater than 0")
        if round(self.heartbeat_interval * 1000) < 1:  # welcome carries it in whole ms (spec 3)
            raise LocalProtocolError("Config.heartbeat_interval must be at least 0.001 s")
