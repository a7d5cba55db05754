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
    app_ping_interval: float = 30.0
    app_ping_offset: float = 15.0
    heartbeat_interval: float = 30.0
    dead_peer_timeout: float = 75.0
    hello_timeout: float = 10.0
    close_grace: float = 30.0
    close_timeout: float = 5.0
    """After our close frame, how long to wait for the peer's before dropping the transport."""
    # reconnect and resume (spec section 5)
    reconnect_base_delay: float = 1.0
    reconnect_max_delay: float = 30.0
    resume_window: float = 30.0
    agent_deadline_margin: float = 1.0
    """The agent tells a handler to stop this long after a dispatch's deadline, so the mesh's
    own timeout (and its `cancel`) normally comes first and the caller sees DEADLINE_EXCEEDED."""
    outbox_limit: int = 1000
    finished_cache_size: int = 10_000
    # WebSocket limits (spec section 4)
    max_message_bytes: int = 1 << 20
    max_fragments: int = 1024
    max_handshake_bytes: int = 16 * 1024
    # inbound limits answered with RATE_LIMITED (spec section 3, error codes)
    max_frames_per_second: float = 10_000.0
    frame_burst: int = 10_000
    max_in_flight: int = 1000
    """Dispatches an agent runs at once, and tool calls a mesh serves at once per connection."""
    rate_limit_retry_after: float = 1.0
    max_pending_chunks: int = 1024
    """Out-of-order chunks buffered per dispatch while waiting for a gap to fill."""

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
