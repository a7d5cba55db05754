"""Reconnect backoff and the "retry or give up" decisions of spec section 5.

`AgentRuntime` owns reconnecting (STYLE: a decision two adapters would both
make belongs in the core): it asks `Backoff.next_delay()` how long to wait,
adds it to its own `now`, and asks the `classify_*` functions whether a failed
handshake or a closed connection is worth another attempt. Pure: randomness is
injected as `rand`, time is never read.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from typing import Final

from .errors import LocalProtocolError

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_BACKOFF_FACTOR",
    "DEFAULT_BACKOFF_JITTER",
    "Backoff",
    "RetryDecision",
    "backoff_delays",
    "classify_close",
    "classify_error_code",
    "classify_handshake_status",
]

DEFAULT_BACKOFF_BASE: Final = 1.0
"""First delay in seconds (spec section 5: 1, 2, 4, 8, 16, 30, 30, ...)."""
DEFAULT_BACKOFF_FACTOR: Final = 2.0
"""Each delay doubles the previous one until the cap."""
DEFAULT_BACKOFF_CAP: Final = 30.0
"""Largest delay in seconds before jitter."""
DEFAULT_BACKOFF_JITTER: Final = 0.25
"""Each delay is multiplied by a uniform factor in [1 - jitter, 1 + jitter] = [0.75, 1.25]."""


def _check_settings(base: float, factor: float, cap: float, jitter: float) -> None:
    if not (math.isfinite(base) and base > 0):
        raise LocalProtocolError(f"backoff base must be a finite number > 0, got {base!r}")
    if not (math.isfinite(factor) and factor >= 1):
        raise LocalProtocolError(f"backoff factor must be a finite number >= 1, got {factor!r}")
    if not (math.isfinite(cap) and cap >= base):
        raise LocalProtocolError(f"backoff cap must be finite and >= base ({base}), got {cap!r}")
    if not 0 <= jitter < 1:
        raise LocalProtocolError(f"backoff jitter must be in [0, 1), got {jitter!r}")


def backoff_delays(
    rand: Callable[[], float],
    *,
    base: float = DEFAULT_BACKOFF_BASE,
    factor: float = DEFAULT_BACKOFF_FACTOR,
    cap: float = DEFAULT_BACKOFF_CAP,
    jitter: float = DEFAULT_BACKOFF_JITTER,
) -> Iterator[float]:
    """Endless reconnect delays in seconds: 1, 2, 4, 8, 16, 30, 30, ... times jitter.

    Each step is multiplied by `(1 - jitter) + 2 * jitter * rand()`, with the
    defaults `0.75 + 0.5 * rand()` (spec section 5: uniform in [0.75, 1.25]).
    `rand` returns a float in [0, 1] (e.g. `random.Random().random`), so tests
    can pin it. Settings are checked at once; a `rand` value outside [0, 1]
    raises `LocalProtocolError` when drawn.
    """
    _check_settings(base, factor, cap, jitter)
    return _delays(rand, base, factor, cap, jitter)


def _delays(
    rand: Callable[[], float], base: float, factor: float, cap: float, jitter: float
) -> Iterator[float]:
    low, span = 1.0 - jitter, 2.0 * jitter
    step = base
    while True:
        sample = rand()
        if not 0.0 <= sample <= 1.0:  # also rejects NaN
            raise LocalProtocolError(f"rand() must return a float in [0, 1], got {sample!r}")
        yield step * (low + span * sample)
        step = min(step * factor, cap)


class Backoff:
    """The reconnect delay sequence of one client, restarted after each `welcome`.

    Call `next_delay()` before each reconnect attempt and `reset()` once a
    `welcome` arrives (spec section 5: "reset after a welcome").
    """

    def __init__(
        self,
        rand: Callable[[], float],
        *,
        base: float = DEFAULT_BACKOFF_BASE,
        factor: float = DEFAULT_BACKOFF_FACTOR,
        cap: float = DEFAULT_BACKOFF_CAP,
        jitter: float = DEFAULT_BACKOFF_JITTER,
    ) -> None:
        _check_settings(base, factor, cap, jitter)
        self._rand = rand
        self._base = base
        self._factor = factor
        self._cap = cap
        self._jitter = jitter
        self._delays = _delays(rand, base, factor, cap, jitter)
        self._attempts = 0

    @property
    def attempts(self) -> int:
        """Delays handed out since the last reset (0 right after a welcome)."""
        return self._attempts

    def next_delay(self, *, at_least: float = 0.0) -> float:
        """Seconds to wait before the next attempt; advances the sequence.

        `at_least` lets a server hint win when it is longer, e.g. an `error`
        `RATE_LIMITED` frame's `detail.retry_after_ms / 1000` (spec section 3).
        """
        if not (math.isfinite(at_least) and at_least >= 0):
            raise LocalProtocolError(f"at_least must be a finite number >= 0, got {at_least!r}")
        delay = next(self._delays)
        self._attempts += 1
        return max(delay, at_least)

    def reset(self) -> None:
        """Start again from the first delay, after a `welcome` (spec section 5)."""
        self._delays = _delays(self._rand, self._base, self._factor, self._cap, self._jitter)
        self._attempts = 0


class RetryDecision(enum.Enum):
    """What a client does after a failed handshake or a closed connection (spec section 5)."""

    RETRY = "retry"
    """Wait `Backoff.next_delay()` and reconnect with the same token."""
    REFRESH_TOKEN_THEN_RETRY = "refresh_token_then_retry"
    """Get a fresh transport JWT (spec section 6 `/auth/token`), then reconnect with backoff."""
    FINAL = "final"
    """Do not reconnect: raise to the caller (or, after our own close, just stop)."""


# Handshake answers of spec section 1 that no retry can fix.
_FINAL_HANDSHAKE_STATUSES: Final = frozenset(
    {
        400,  # MISSING_INSTANCE_ID / UNSUPPORTED_SUBPROTOCOL: our request is wrong
        403,  # TENANT_MISMATCH
        404,  # INSTANCE_NOT_FOUND
        409,  # DEPLOYMENT_MODE_MISMATCH: registered as hosted
        426,  # UPGRADE_REQUIRED: the server does not take our upgrade, svantic.v1 is not spoken
    }
)
_UNAUTHORIZED: Final = 401
_SWITCHING_PROTOCOLS: Final = 101
_POLICY_VIOLATION: Final = 1008  # spec section 4: AUTH_EXPIRED
_AUTH_EXPIRED: Final = "AUTH_EXPIRED"


def classify_handshake_status(status: int, *, token_already_refreshed: bool) -> RetryDecision:
    """Decide what to do after the server refused the upgrade with HTTP `status`.

    Spec section 5: 400, 403, 404 and 409 are FINAL (so is 426: no svantic.v1
    here). 401 asks for a fresh token once; when the refreshed token was refused
    too (`token_already_refreshed=True`) the client backs off and keeps trying.
    429, 5xx and anything else are RETRY. A client that cannot refresh its token
    treats REFRESH_TOKEN_THEN_RETRY as RETRY. Passing 101 (a successful
    upgrade) raises `LocalProtocolError`.
    """
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 999:
        raise LocalProtocolError(f"status must be an HTTP status code, got {status!r}")
    if status == _SWITCHING_PROTOCOLS:
        raise LocalProtocolError("101 is a successful upgrade: there is nothing to retry")
    if status in _FINAL_HANDSHAKE_STATUSES:
        return RetryDecision.FINAL
    if status == _UNAUTHORIZED:
        if token_already_refreshed:
            return RetryDecision.RETRY
        return RetryDecision.REFRESH_TOKEN_THEN_RETRY
    return RetryDecision.RETRY


def classify_error_code(code: str) -> RetryDecision:
    """Decide what an `error` frame seen just before a close means for reconnecting.

    `AUTH_EXPIRED` asks for a fresh token first (spec section 5); any other code,
    known or not, is RETRY (spec section 3: unknown codes never crash a receiver).
    """
    if code == _AUTH_EXPIRED:
        return RetryDecision.REFRESH_TOKEN_THEN_RETRY
    return RetryDecision.RETRY


def classify_close(
    code: int | None, *, requested_by_us: bool, error_code: str | None = None
) -> RetryDecision:
    """Decide what to do after an established connection closed with `code`.

    Spec section 5: a close we asked for ourselves is FINAL. Every other close is
    RETRY, whatever the code (1000 after the mesh's `close_request`, 1001, 1002,
    1003, 1007, 1009, 1011, unknown codes, or `None` for an abnormal end without
    a close frame), except 1008 (`AUTH_EXPIRED`), which asks for a fresh token
    first. `error_code`, the code of an `error` frame received just before the
    close, lets an `AUTH_EXPIRED` frame ask for a fresh token whatever the code.
    """
    if requested_by_us:
        return RetryDecision.FINAL
    if code == _POLICY_VIOLATION:
        return RetryDecision.REFRESH_TOKEN_THEN_RETRY
    if error_code is not None:
        return classify_error_code(error_code)
    return RetryDecision.RETRY
