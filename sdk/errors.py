"""The SDK's errors: the control plane's `{"error": {"code", "message"}}` answers as classes.

Each class keeps the server's own message, so what a `try/except` prints is what the mesh
said; `code` and `status` are kept too, so an unknown code still reaches the caller whole
(as `SvanticApiError`). `error_for` picks the class by code first, then by status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "AgentCardProbeFailedError",
    "AgentDisconnectedError",
    "AgentTypeNotAllowedError",
    "AgentUnavailableError",
    "AgentUnhealthyError",
    "DeadlineExceededError",
    "DeploymentModeMismatchError",
    "InstanceNotFoundError",
    "InvalidRequestError",
    "NotConnectedError",
    "SvanticApiError",
    "TenantMismatchError",
    "UnauthorizedError",
    "error_for",
]


class SvanticApiError(Exception):
    """A control-plane (or dispatch) failure: the HTTP `status`, the spec 1 `code`, and the
    server's `message`."""

    status_code: ClassVar[int] = 0
    error_code: ClassVar[str] = ""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code} ({status}): {message}" if message else f"{code} ({status})")
        self.status = status
        self.code = code
        self.message = message


class InvalidRequestError(SvanticApiError):
    status_code, error_code = 400, "INVALID_REQUEST"


class UnauthorizedError(SvanticApiError):
    status_code, error_code = 401, "UNAUTHORIZED"


class AgentTypeNotAllowedError(SvanticApiError):
    status_code, error_code = 403, "AGENT_TYPE_NOT_ALLOWED"


class TenantMismatchError(SvanticApiError):
    status_code, error_code = 403, "TENANT_MISMATCH"


class InstanceNotFoundError(SvanticApiError):
    status_code, error_code = 404, "INSTANCE_NOT_FOUND"


class DeploymentModeMismatchError(SvanticApiError):
    status_code, error_code = 409, "DEPLOYMENT_MODE_MISMATCH"


class AgentCardProbeFailedError(SvanticApiError):
    status_code, error_code = 502, "AGENT_CARD_PROBE_FAILED"


class AgentUnavailableError(SvanticApiError):
    status_code, error_code = 503, "AGENT_UNAVAILABLE"


class AgentDisconnectedError(SvanticApiError):
    status_code, error_code = 502, "AGENT_DISCONNECTED"


class AgentUnhealthyError(SvanticApiError):
    status_code, error_code = 502, "AGENT_UNHEALTHY"


class DeadlineExceededError(SvanticApiError):
    status_code, error_code = 504, "DEADLINE_EXCEEDED"


class NotConnectedError(RuntimeError):
    """A call that needs a live registration (`create_session`, `re_register`, ...) made
    before `connect()` or after `disconnect()`."""


_BY_CODE: dict[str, type[SvanticApiError]] = {
    cls.error_code: cls
    for cls in (
        InvalidRequestError, UnauthorizedError, AgentTypeNotAllowedError, TenantMismatchError,
        InstanceNotFoundError, DeploymentModeMismatchError, AgentCardProbeFailedError,
        AgentUnavailableError, AgentDisconnectedError, AgentUnhealthyError,
        DeadlineExceededError,
    )
}
_BY_STATUS: dict[int, type[SvanticApiError]] = {
    400: InvalidRequestError,
    401: UnauthorizedError,
}


def error_for(status: int, body: Any) -> SvanticApiError:
    """The error for one failed answer: `body` is the decoded JSON (or anything else, when
    the server did not answer the spec's error shape)."""
    code, message = "", ""
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping):
        code = str(error.get("code") or "")
        message = str(error.get("message") or "")
    if not code:
        code = {400: "INVALID_REQUEST", 401: "UNAUTHORIZED", 404: "NOT_FOUND",
                500: "INTERNAL"}.get(status, "HTTP_ERROR")
        message = message or f"the mesh answered HTTP {status}"
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or SvanticApiError
    return cls(status, code, message)
