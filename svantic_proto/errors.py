"""Exception types shared by the whole core.

The split follows h11: `LocalProtocolError` is *you* misusing the API (raised at
once, never sent on the wire); `RemoteProtocolError` is the *peer* breaking the
protocol (the core answers it with an error frame and/or close code and reports
the cause). Every error a user can meet carries a stable `code` from the spec.
"""

from __future__ import annotations

__all__ = [
    "SvanticError",
    "FrameError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "InvalidState",
]


class SvanticError(Exception):
    """Base of every exception the library raises on purpose."""

    code: str = "INTERNAL"


class FrameError(SvanticError):
    """A received message is not a valid svantic.v1 frame (spec section 2).

    `close_code` says how the connection must end: 1002 for an invalid frame,
    1007 for text that is not UTF-8, and `None` when the envelope is valid but its
    `type` is unknown: then the receiver answers `BAD_FRAME` and keeps the socket.
    `frame_id` is the frame's `id` when one could be read, for `in_reply_to`.
    """

    code = "BAD_FRAME"

    def __init__(
        self, message: str, *, close_code: int | None = 1002, frame_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.close_code = close_code
        self.frame_id = frame_id

    def __repr__(self) -> str:
        return (
            f"FrameError({self.message!r}, close_code={self.close_code!r}, "
            f"frame_id={self.frame_id!r})"
        )


class LocalProtocolError(SvanticError):
    """The caller used the API in a way the protocol forbids (a bug in the caller)."""

    code = "LOCAL_PROTOCOL_ERROR"


class RemoteProtocolError(SvanticError):
    """The peer broke the protocol; `close_code` is how the connection was ended."""

    def __init__(self, message: str, *, code: str = "BAD_FRAME", close_code: int | None = None):
        super().__init__(message)
        self.code = code
        self.close_code = close_code


class InvalidState(SvanticError):
    """The object was used after it failed or closed."""

    code = "INVALID_STATE"
