"""What a failed dial was, for the agent runtime's retry decision (written once for every
driver: the runtime itself may not import `ssl` or `socket`)."""

from __future__ import annotations

import socket
import ssl

from svantic_proto.agent_runtime import DialFailure
from svantic_proto.errors import TlsError

__all__ = ["dial_failure"]


def dial_failure(exc: BaseException) -> tuple[DialFailure, str]:
    """The kind of a dial's failure and a one-line reason for the log."""
    if isinstance(exc, ConnectionRefusedError):
        return DialFailure.REFUSED, str(exc) or "connection refused"
    if isinstance(exc, TimeoutError):
        return DialFailure.TIMED_OUT, str(exc) or "timed out"
    if isinstance(exc, socket.gaierror):
        return DialFailure.NAME_RESOLUTION, str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return DialFailure.TLS, f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, (TlsError, ssl.SSLError)):
        return DialFailure.TLS, str(exc)
    return DialFailure.NETWORK, f"{type(exc).__name__}: {exc}"
