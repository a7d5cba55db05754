"""svantic-proto: a sans-IO implementation of the svantic.v1 agent-mesh protocol."""

from __future__ import annotations

from .errors import FrameError, InvalidState, LocalProtocolError, RemoteProtocolError, SvanticError

__all__ = [
    "FrameError",
    "InvalidState",
    "LocalProtocolError",
    "RemoteProtocolError",
    "SvanticError",
]
