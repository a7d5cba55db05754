"""Reconnect backoff and retry decisions (spec section 5)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svantic_proto.backoff import (
    Backoff,
    RetryDecision,
    backoff_delays,
    classify_close,
    classify_error_code,
    classify_handshake_status,
)
from svantic_proto.errors import LocalProtocolError

SPEC_STEPS = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
JUST_BELOW_ONE = math.nextafter(1.0, 0.0)


def constant(value: float) -> Callable[[], float]:
    return lambda: value


def first(count: int, rand: Callable[[], float]) -> list[float]:
    return list(itertools.islice(backoff_delays(rand), count))


# --------------------------------------------------------------------------- delays


def test_middle_of_the_jitter_gives_the_spec_sequence() -> None:
    assert first(8, constant(0.5)) == SPEC_STEPS


def test_lowest_jitter_is_three_quarters() -> None:
    assert first(8, constant(0.0)) == [step * 0.75 for step in SPEC_STEPS]


def test_highest_jitter_stays_below_five_quarters() -> None:
    delays = first(8, constant(0.999))
    for delay, step in zip(delays, SPEC_STEPS, strict=True):
        assert delay == step * (0.75 + 0.5 * 0.999)
        assert step * 1.2494 < delay < step * 1.25
    # The largest float below 1 may round up to the spec's closed bound, never past it.
    for delay, step in zip(first(8, constant(JUST_BELOW_ONE)), SPEC_STEPS, strict=True):
        assert step * 1.2499 < delay <= step * 1.25


def test_delay_is_the_step_times_three_quarters_plus_half_rand() -> None:
    draws = iter([0.1, 0.9, 0.25, 0.75])
    delays = first(4, lambda: next(draws))
    assert delays == [1 * (0.75 + 0.5 * 0.1), 2 * (0.75 + 0.5 * 0.9), 4 * 0.875, 8 * 1.125]


def test_the_cap_holds_forever() -> None:
    delays = first(1000, constant(0.5))
    assert delays[5:] == [30.0] * 995


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_every_delay_is_within_the_jitter_band(seed: int) -> None:
    delays = first(12, random.Random(seed).random)
    steps = [*SPEC_STEPS, 30.0, 30.0, 30.0, 30.0]
    for delay, step in zip(delays, steps, strict=True):
        assert 0.75 * step <= delay <= 1.25 * step


def test_base_cap_factor_and_jitter_are_configurable() -> None:
    delays = itertools.islice(
        backoff_delays(constant(0.0), base=0.5, factor=3.0, cap=10.0, jitter=0.0), 5
    )
    assert list(delays) == [0.5, 1.5, 4.5, 10.0, 10.0]


@pytest.mark.parametrize(
    "settings_kwargs",
    [
        {"base": 0.0},
        {"base": -1.0},
        {"base": math.inf},
        {"factor": 0.5},
        {"cap": 0.5},
        {"cap": math.nan},
        {"jitter": 1.0},
        {"jitter": -0.1},
    ],
)
def test_bad_settings_raise_at_once(settings_kwargs: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        backoff_delays(constant(0.5), **settings_kwargs)
    with pytest.raises(LocalProtocolError):
        Backoff(constant(0.5), **settings_kwargs)


@pytest.mark.parametrize("bad_draw", [-0.1, 1.5, math.nan])
def test_a_rand_outside_the_unit_interval_is_api_misuse(bad_draw: float) -> None:
    delays = backoff_delays(constant(bad_draw))
    with pytest.raises(LocalProtocolError):
        next(delays)


def test_backoff_resets_after_a_welcome() -> None:
    backoff = Backoff(constant(0.5))
    assert [backoff.next_delay() for _ in range(7)] == SPEC_STEPS[:7]
    assert backoff.attempts == 7
    backoff.reset()
    assert backoff.attempts == 0
    assert [backoff.next_delay() for _ in range(3)] == [1.0, 2.0, 4.0]


def test_backoff_draws_one_rand_per_delay() -> None:
    draws = iter([0.0, 0.5, 0.999, 0.0])
    backoff = Backoff(lambda: next(draws))
    assert backoff.next_delay() == 0.75
    assert backoff.next_delay() == 2.0
    backoff.reset()
    assert backoff.next_delay() < 1.25
    assert backoff.next_delay() == 1.5


def test_a_server_hint_can_lengthen_the_delay() -> None:
    backoff = Backoff(constant(0.5))
    assert backoff.next_delay(at_least=5.0) == 5.0  # step 1 s, RATE_LIMITED says 5 s
    assert backoff.next_delay(at_least=0.1) == 2.0
    with pytest.raises(LocalProtocolError):
        backoff.next_delay(at_least=-1.0)


# --------------------------------------------------------------------------- handshake statuses


@pytest.mark.parametrize("status", [400, 403, 404, 409, 426])
@pytest.mark.parametrize("refreshed", [False, True])
def test_handshake_refusals_that_no_retry_can_fix_are_final(status: int, refreshed: bool) -> None:
    assert (
        classify_handshake_status(status, token_already_refreshed=refreshed) is RetryDecision.FINAL
    )


def test_401_refreshes_the_token_once_then_backs_off() -> None:
    assert (
        classify_handshake_status(401, token_already_refreshed=False)
        is RetryDecision.REFRESH_TOKEN_THEN_RETRY
    )
    assert classify_handshake_status(401, token_already_refreshed=True) is RetryDecision.RETRY


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 599, 200, 302, 418, 431])
def test_other_handshake_statuses_are_retried(status: int) -> None:
    assert classify_handshake_status(status, token_already_refreshed=False) is RetryDecision.RETRY


@pytest.mark.parametrize("status", [101, 0, 99, 1000, -401])
def test_a_non_failure_status_is_api_misuse(status: int) -> None:
    with pytest.raises(LocalProtocolError):
        classify_handshake_status(status, token_already_refreshed=False)


# --------------------------------------------------------------------------- close codes


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1009, 1011, None, 1006, 4000])
def test_every_close_we_did_not_ask_for_is_retried(code: int | None) -> None:
    assert classify_close(code, requested_by_us=False) is RetryDecision.RETRY


def test_policy_close_refreshes_the_token_first() -> None:
    assert classify_close(1008, requested_by_us=False) is RetryDecision.REFRESH_TOKEN_THEN_RETRY


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1008, 1011, None])
def test_a_close_we_asked_for_is_final(code: int | None) -> None:
    assert classify_close(code, requested_by_us=True) is RetryDecision.FINAL
    assert (
        classify_close(code, requested_by_us=True, error_code="AUTH_EXPIRED") is RetryDecision.FINAL
    )


def test_an_auth_expired_error_before_the_close_refreshes_the_token() -> None:
    assert (
        classify_close(None, requested_by_us=False, error_code="AUTH_EXPIRED")
        is RetryDecision.REFRESH_TOKEN_THEN_RETRY
    )
    assert (
        classify_close(1002, requested_by_us=False, error_code="BAD_FRAME") is RetryDecision.RETRY
    )


@pytest.mark.parametrize(
    ("code", "decision"),
    [
        ("AUTH_EXPIRED", RetryDecision.REFRESH_TOKEN_THEN_RETRY),
        ("BAD_FRAME", RetryDecision.RETRY),
        ("INTERNAL", RetryDecision.RETRY),
        ("RATE_LIMITED", RetryDecision.RETRY),
        ("AGENT_DISCONNECTED", RetryDecision.RETRY),
        ("SOMETHING_NEW", RetryDecision.RETRY),
    ],
)
def test_error_codes_before_a_close(code: str, decision: RetryDecision) -> None:
    assert classify_error_code(code) is decision
