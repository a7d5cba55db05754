"""W3C Trace Context and Baggage parsing for dispatch propagation_headers (spec sections 3, 8)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svantic_proto.errors import LocalProtocolError, SvanticError
from svantic_proto.trace import (
    BAGGAGE_MAX_BYTES,
    BAGGAGE_MAX_MEMBERS,
    Baggage,
    BaggageMember,
    BaggageProperty,
    SessionTraceContext,
    TraceContextError,
    TraceParent,
    child_propagation_headers,
    format_baggage,
    format_traceparent,
    new_span_id,
    new_trace_id,
    parse_baggage,
    parse_traceparent,
    trace_context_from_headers,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
# The W3C test suite's ids.
SUITE_TRACE_ID = "12345678901234567890123456789012"
SUITE_PARENT_ID = "1234567890123456"


# --------------------------------------------------------------------------- traceparent


def test_w3c_example_sampled() -> None:
    parsed = parse_traceparent(SAMPLED)
    assert parsed == TraceParent("00", TRACE_ID, PARENT_ID, 0x01)
    assert parsed.sampled
    assert format_traceparent(parsed) == SAMPLED


def test_w3c_example_not_sampled() -> None:
    value = f"00-{TRACE_ID}-{PARENT_ID}-00"
    parsed = parse_traceparent(value)
    assert not parsed.sampled
    assert parsed.trace_flags == 0
    assert format_traceparent(parsed) == value


def test_sampled_reads_only_the_sampled_bit() -> None:
    # W3C: "09" is sampled plus an unknown bit; mask, don't compare the number.
    parsed = parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-09")
    assert parsed.sampled
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-08").sampled is False
    # A version-00 value is re-emitted with its flags whole.
    assert format_traceparent(parsed).endswith("-09")


@pytest.mark.parametrize("padding", [" ", "\t", " \t ", "\t\t"])
def test_leading_and_trailing_ows_is_trimmed(padding: str) -> None:
    assert parse_traceparent(f"{padding}{SAMPLED}{padding}").trace_id == TRACE_ID


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        # upper-case hex anywhere
        (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", "trace-id"),
        (f"00-{TRACE_ID}-{PARENT_ID.upper()}-01", "parent-id"),
        (f"00-{TRACE_ID}-{PARENT_ID}-0A", "trace-flags"),
        (f"0A-{TRACE_ID}-{PARENT_ID}-01", "version"),
        # all-zero ids
        (f"00-{'0' * 32}-{SUITE_PARENT_ID}-01", "all zeros"),
        (f"00-{SUITE_TRACE_ID}-{'0' * 16}-01", "all zeros"),
        # forbidden version
        (f"ff-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01", "'ff'"),
        # illegal characters (W3C test suite)
        (f".0-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01", "version"),
        (f"0.-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01", "version"),
        (f"00-.2345678901234567890123456789012-{SUITE_PARENT_ID}-01", "trace-id"),
        (f"00-1234567890123456789012345678901.-{SUITE_PARENT_ID}-01", "trace-id"),
        (f"00-{SUITE_TRACE_ID}-.234567890123456-01", "parent-id"),
        (f"00-{SUITE_TRACE_ID}-123456789012345.-01", "parent-id"),
        (f"00-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-.0", "trace-flags"),
        (f"00-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-0.", "trace-flags"),
        (f"00-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-0g", "trace-flags"),
        # version-00 length errors
        (f"000-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01", "version"),
        (f"0-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01", "version"),
        (f"00-123456789012345678901234567890123-{SUITE_PARENT_ID}-01", "56"),
        (f"00-1234567890123456789012345678901-{SUITE_PARENT_ID}-01", "54"),
        (f"00-{SUITE_TRACE_ID}-12345678901234567-01", "56"),
        (f"00-{SUITE_TRACE_ID}-123456789012345-01", "54"),
        (f"00-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-1", "54"),
        (f"00-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-011", "56"),
        (f"00-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01.", "56"),
        (f"00-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01-what-the-future-will-be-like", "exactly 55"),
        # higher version, too short or not followed by "-"
        (f"cc-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-1", "at least 55"),
        (f"cc-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01.what-the-future-will-be-like", "'-'"),
        (f"cc-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-012", "'-'"),
        # wrong separators, empty
        (f"00_{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01", "version"),
        (f"00-{SUITE_TRACE_ID}_{SUITE_PARENT_ID}-01", "version-trace_id"),
        ("", "version"),
        ("   ", "version"),
        # OWS inside the value is not trimmed
        (f"00- {SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01", "56"),
        # non-ASCII digits are not hex
        (f"00-{SUITE_TRACE_ID[:-1]}\u0661-{SUITE_PARENT_ID}-01", "trace-id"),
    ],
)
def test_invalid_traceparent_is_rejected_with_a_reason(value: str, complaint: str) -> None:
    with pytest.raises(TraceContextError) as caught:
        parse_traceparent(value)
    assert complaint in str(caught.value)
    assert caught.value.code == "INVALID_TRACE_CONTEXT"
    assert isinstance(caught.value, SvanticError)


def test_future_version_is_read_with_the_version_00_layout() -> None:
    parsed = parse_traceparent(f"cc-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01")
    assert (parsed.version, parsed.trace_id, parsed.parent_id) == (
        "cc",
        SUITE_TRACE_ID,
        SUITE_PARENT_ID,
    )
    assert format_traceparent(parsed) == f"00-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01"


def test_future_version_extra_fields_are_ignored() -> None:
    parsed = parse_traceparent(
        f"cc-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01-what-the-future-will-be-like"
    )
    assert parsed.trace_id == SUITE_TRACE_ID
    assert parsed.sampled
    assert format_traceparent(parsed) == f"00-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01"


def test_future_version_unknown_flags_are_not_re_emitted() -> None:
    parsed = parse_traceparent(f"01-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-ff-x")
    assert parsed.trace_flags == 0xFF
    assert format_traceparent(parsed) == f"00-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-01"
    unsampled = parse_traceparent(f"fe-{SUITE_TRACE_ID}-{SUITE_PARENT_ID}-fe")
    assert format_traceparent(unsampled).endswith("-00")


@pytest.mark.parametrize(
    "arguments",
    [
        ("ff", TRACE_ID, PARENT_ID, 1),
        ("0", TRACE_ID, PARENT_ID, 1),
        ("00", TRACE_ID.upper(), PARENT_ID, 1),
        ("00", "0" * 32, PARENT_ID, 1),
        ("00", TRACE_ID, "0" * 16, 1),
        ("00", TRACE_ID, PARENT_ID, 256),
        ("00", TRACE_ID, PARENT_ID, -1),
        ("00", TRACE_ID, PARENT_ID, True),
    ],
)
def test_building_an_invalid_traceparent_is_api_misuse(arguments: tuple[object, ...]) -> None:
    with pytest.raises(LocalProtocolError):
        TraceParent(*arguments)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    trace_id=st.binary(min_size=16, max_size=16).filter(any).map(bytes.hex),
    parent_id=st.binary(min_size=8, max_size=8).filter(any).map(bytes.hex),
    flags=st.integers(0, 255),
)
def test_version_00_round_trips(trace_id: str, parent_id: str, flags: int) -> None:
    value = f"00-{trace_id}-{parent_id}-{flags:02x}"
    assert format_traceparent(parse_traceparent(value)) == value


def test_new_ids_are_valid_and_never_all_zero() -> None:
    zeros_then_ones = iter([b"\x00" * 16, b"\x01" * 16, b"\x00" * 8, b"\x02" * 8])
    trace_id = new_trace_id(lambda size: next(zeros_then_ones))
    span_id = new_span_id(lambda size: next(zeros_then_ones))
    assert trace_id == "01" * 16
    assert span_id == "02" * 8
    assert len(new_trace_id()) == 32
    assert len(new_span_id()) == 16
    with pytest.raises(LocalProtocolError):
        new_span_id(bytes)


# --------------------------------------------------------------------------- baggage


def test_w3c_baggage_example_with_percent_encoding() -> None:
    baggage = parse_baggage("userId=alice,serverNode=DF%2028,isProduction=false")
    assert dict(baggage) == {"userId": "alice", "serverNode": "DF 28", "isProduction": "false"}
    assert list(baggage) == ["userId", "serverNode", "isProduction"]


def test_w3c_baggage_example_with_properties_and_ows() -> None:
    baggage = parse_baggage(
        "key1=value1;property1;property2, key2 = value2, key3=value3; propertyKey=propertyValue"
    )
    assert dict(baggage) == {"key1": "value1", "key2": "value2", "key3": "value3"}
    assert baggage.properties("key1") == (
        BaggageProperty("property1"),
        BaggageProperty("property2"),
    )
    assert baggage.properties("key2") == ()
    assert baggage.properties("key3") == (BaggageProperty("propertyKey", "propertyValue"),)
    assert baggage.member("key3") == BaggageMember(
        "key3", "value3", (BaggageProperty("propertyKey", "propertyValue"),)
    )


def test_ows_around_every_separator_is_trimmed() -> None:
    baggage = parse_baggage(" \tuserId =   alice \t, serverNode = DF%2028 ;  k = v ; flag \t")
    assert dict(baggage) == {"userId": "alice", "serverNode": "DF 28"}
    assert baggage.properties("serverNode") == (BaggageProperty("k", "v"), BaggageProperty("flag"))


def test_value_may_contain_equals_and_be_empty() -> None:
    baggage = parse_baggage("expr=a=b==c,empty=")
    assert baggage["expr"] == "a=b==c"
    assert baggage["empty"] == ""


def test_utf8_value_decodes() -> None:
    assert parse_baggage("userId=Am%C3%A9lie")["userId"] == "Amélie"


def test_percent_escapes_that_are_not_utf8_become_replacement_characters() -> None:
    assert parse_baggage("k=a%FFb")["k"] == "a\ufffdb"


@pytest.mark.parametrize(
    "malformed",
    [
        "bad key=v",  # space inside the key
        "k(ey=v",  # "(" is not a token character
        "=v",  # empty key
        "novalue",  # no "="
        "k=v v",  # space inside the value
        'k="v"',  # DQUOTE is not a baggage-octet
        "k=a\\b",  # backslash
        "k=caf\u00e9",  # raw non-ASCII must be percent-encoded
        "k=%zz",  # malformed escape
        "k=100%",  # truncated escape
        "k=%4",  # truncated escape
        "k=v;bad prop",  # property key not a token
        "k=v;p=a b",  # property value with a space
        "k=v\r\nX-Injected: 1",  # control characters
    ],
)
def test_a_malformed_member_is_dropped_and_the_rest_kept(malformed: str) -> None:
    baggage = parse_baggage(f"first=1,{malformed},last=2")
    assert dict(baggage) == {"first": "1", "last": "2"}


@pytest.mark.parametrize("malformed", ["novalue", "k=%zz", "k=v v", "bad key=v"])
def test_strict_parse_rejects_a_malformed_member(malformed: str) -> None:
    with pytest.raises(TraceContextError) as caught:
        parse_baggage(f"first=1,{malformed}", strict=True)
    assert caught.value.code == "INVALID_TRACE_CONTEXT"


def test_empty_list_members_are_skipped_even_when_strict() -> None:
    assert dict(parse_baggage("a=1,, ,b=2,", strict=True)) == {"a": "1", "b": "2"}
    assert len(parse_baggage("")) == 0


def test_duplicate_key_last_wins_in_first_position() -> None:
    baggage = parse_baggage("a=1;p,b=2,a=3;q=r")
    assert list(baggage.items()) == [("a", "3"), ("b", "2")]
    assert baggage.properties("a") == (BaggageProperty("q", "r"),)


def test_members_beyond_64_are_dropped() -> None:
    header = ",".join(f"k{index}=v" for index in range(BAGGAGE_MAX_MEMBERS + 10))
    baggage = parse_baggage(header)
    assert list(baggage) == [f"k{index}" for index in range(BAGGAGE_MAX_MEMBERS)]
    with pytest.raises(TraceContextError):
        parse_baggage(header, strict=True)


def test_members_beyond_8192_bytes_are_dropped_whole() -> None:
    # Two members of 4096 bytes each ("a=" + 4094) plus a comma make 8193 bytes.
    big_a = "a=" + "x" * 4094
    big_b = "b=" + "y" * 4094
    baggage = parse_baggage(f"{big_a},{big_b},c=1")
    # b does not fit whole, so it is dropped; the small c after it still fits.
    assert list(baggage) == ["a", "c"]
    assert len(format_baggage(baggage).encode()) <= BAGGAGE_MAX_BYTES
    exactly_full = parse_baggage(f"{big_a},b={'y' * 4093}")
    assert len(format_baggage(exactly_full)) == BAGGAGE_MAX_BYTES
    assert list(exactly_full) == ["a", "b"]
    with pytest.raises(TraceContextError):
        parse_baggage(f"{big_a},{big_b}", strict=True)


def test_format_drops_what_exceeds_the_limits() -> None:
    many = {f"k{index}": "v" for index in range(100)}
    assert format_baggage(many).count(",") == BAGGAGE_MAX_MEMBERS - 1


def test_format_percent_encodes_what_must_be() -> None:
    text = format_baggage({"serverNode": "DF 28", "pct": "100%", "sep": 'a,b;c"d\\e', "u": "é"})
    assert text == "serverNode=DF%2028,pct=100%25,sep=a%2Cb%3Bc%22d%5Ce,u=%C3%A9"


def test_format_keeps_properties() -> None:
    baggage = Baggage(
        [BaggageMember("k", "v 1", (BaggageProperty("p"), BaggageProperty("q", "r")))]
    )
    assert format_baggage(baggage) == "k=v%201;p;q=r"
    assert parse_baggage(format_baggage(baggage)) == baggage


def test_baggage_is_an_immutable_mapping() -> None:
    baggage = Baggage({"a": "1"})
    with pytest.raises(TypeError):
        baggage["a"] = "2"  # type: ignore[index]
    with pytest.raises(AttributeError):
        baggage._members = {}
    changed = baggage.with_member("b", "2", [BaggageProperty("p")])
    assert dict(baggage) == {"a": "1"}
    assert dict(changed) == {"a": "1", "b": "2"}
    assert changed.properties("b") == (BaggageProperty("p"),)
    assert dict(changed.without("a")) == {"b": "2"}
    assert baggage == {"a": "1"}
    assert hash(Baggage({"a": "1"})) == hash(baggage)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Baggage({"bad key": "v"}),
        lambda: BaggageMember("k", "\ud800"),
        lambda: BaggageProperty("k", "a b"),
        lambda: Baggage(["k=v"]),  # type: ignore[list-item]
    ],
)
def test_building_invalid_baggage_is_api_misuse(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


_TOKEN_ALPHABET = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_tokens = st.text(alphabet=_TOKEN_ALPHABET, min_size=1, max_size=12)
# Any text that UTF-8 can carry: everything but lone surrogates.
_values = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(entries=st.dictionaries(_tokens, _values, max_size=8))
def test_format_then_parse_is_the_identity(entries: dict[str, str]) -> None:
    text = format_baggage(entries)
    assert text.isascii()
    parsed = parse_baggage(text, strict=True)
    assert list(parsed.items()) == list(entries.items())


# --------------------------------------------------------------------------- session context


def test_context_from_dispatch_headers() -> None:
    context = trace_context_from_headers(
        {"traceparent": SAMPLED, "baggage": "userId=alice,isProduction=false"}
    )
    assert context.parent_trace_id == TRACE_ID
    assert context.parent_span_id == PARENT_ID
    assert context.sampled
    assert dict(context.baggage) == {"userId": "alice", "isProduction": "false"}
    assert context.traceparent == TraceParent("00", TRACE_ID, PARENT_ID, 1)


@pytest.mark.parametrize("name", ["TraceParent", "TRACEPARENT", "TrAcEpArEnT"])
def test_header_names_match_in_any_case(name: str) -> None:
    context = trace_context_from_headers({name: SAMPLED, "Baggage": "a=1"})
    assert context.parent_trace_id == TRACE_ID
    assert dict(context.baggage) == {"a": "1"}


@pytest.mark.parametrize("headers", [None, {}, {"other": "x"}])
def test_no_headers_give_an_empty_context(headers: dict[str, str] | None) -> None:
    context = trace_context_from_headers(headers)
    assert context == SessionTraceContext()
    assert context.parent_trace_id is None
    assert context.parent_span_id is None
    assert dict(context.baggage) == {}


@pytest.mark.parametrize(
    "traceparent",
    [
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
        f"00-{'0' * 32}-{PARENT_ID}-01",
        f"ff-{TRACE_ID}-{PARENT_ID}-01",
        "garbage",
    ],
)
def test_malformed_traceparent_restarts_the_trace_without_failing(traceparent: str) -> None:
    context = trace_context_from_headers(
        {"traceparent": traceparent, "tracestate": "congo=t61rcWkgMzE", "baggage": "a=1"}
    )
    assert context.parent_trace_id is None
    assert context.parent_span_id is None
    # W3C: tracestate is not used without a valid traceparent; baggage is independent.
    assert context.tracestate is None
    assert dict(context.baggage) == {"a": "1"}


def test_duplicated_traceparent_restarts_the_trace() -> None:
    context = trace_context_from_headers({"traceparent": SAMPLED, "Traceparent": SAMPLED})
    assert context.parent_trace_id is None


def test_malformed_baggage_does_not_fail_the_dispatch() -> None:
    context = trace_context_from_headers({"traceparent": SAMPLED, "baggage": "a b c,ok=1,%%%"})
    assert context.parent_trace_id == TRACE_ID
    assert dict(context.baggage) == {"ok": "1"}


def test_several_baggage_headers_are_combined() -> None:
    context = trace_context_from_headers({"baggage": "userId=alice", "BAGGAGE": "node=DF%2028"})
    assert dict(context.baggage) == {"userId": "alice", "node": "DF 28"}


def test_future_version_parent_keeps_only_known_flags() -> None:
    context = trace_context_from_headers(
        {"traceparent": f"cc-{TRACE_ID}-{PARENT_ID}-03-future-stuff"}
    )
    assert context.trace_flags == 0x01
    headers = child_propagation_headers(context, "b7ad6b7169203331")
    assert headers["traceparent"] == f"00-{TRACE_ID}-b7ad6b7169203331-01"


def test_child_headers_continue_the_parent_trace() -> None:
    context = trace_context_from_headers(
        {
            "traceparent": SAMPLED,
            "tracestate": "congo=t61rcWkgMzE",
            "baggage": "serverNode=DF%2028;p",
        }
    )
    headers = child_propagation_headers(context, "b7ad6b7169203331")
    assert headers == {
        "traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01",
        "tracestate": "congo=t61rcWkgMzE",
        "baggage": "serverNode=DF%2028;p",
    }
    # The receiving side of those headers sees the child span as its parent.
    downstream = trace_context_from_headers(headers)
    assert downstream.parent_trace_id == TRACE_ID
    assert downstream.parent_span_id == "b7ad6b7169203331"
    assert downstream.baggage == context.baggage


def test_child_headers_can_override_sampling() -> None:
    context = trace_context_from_headers({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-09"})
    unsampled = child_propagation_headers(context, "b7ad6b7169203331", sampled=False)
    assert unsampled["traceparent"].endswith("-08")
    assert "baggage" not in unsampled


def test_child_headers_start_a_new_trace_only_when_asked() -> None:
    context = trace_context_from_headers({"baggage": "a=1"})
    with pytest.raises(LocalProtocolError, match="new_trace_id"):
        child_propagation_headers(context, "b7ad6b7169203331")
    headers = child_propagation_headers(
        context, "b7ad6b7169203331", new_trace_id=SUITE_TRACE_ID, sampled=True
    )
    assert headers == {
        "traceparent": f"00-{SUITE_TRACE_ID}-b7ad6b7169203331-01",
        "baggage": "a=1",
    }
    default = child_propagation_headers(context, new_span_id(), new_trace_id=new_trace_id())
    assert default["traceparent"].endswith("-00")


@pytest.mark.parametrize("span_id", ["0" * 16, "B7AD6B7169203331", "b7ad", ""])
def test_child_headers_reject_an_invalid_span_id(span_id: str) -> None:
    context = trace_context_from_headers({"traceparent": SAMPLED})
    with pytest.raises(LocalProtocolError):
        child_propagation_headers(context, span_id)


def test_control_characters_in_tracestate_are_not_propagated() -> None:
    context = trace_context_from_headers(
        {"traceparent": SAMPLED, "tracestate": "congo=x\r\nX-Injected: 1"}
    )
    assert context.parent_trace_id == TRACE_ID
    assert context.tracestate is None


def test_session_context_converts_a_plain_mapping_and_validates_ids() -> None:
    context = SessionTraceContext(TRACE_ID, PARENT_ID, {"a": "1"})
    assert isinstance(context.baggage, Baggage)
    assert hash(context) == hash(SessionTraceContext(TRACE_ID, PARENT_ID, Baggage({"a": "1"})))
    with pytest.raises(LocalProtocolError):
        SessionTraceContext(TRACE_ID, None)
    with pytest.raises(LocalProtocolError):
        SessionTraceContext(TRACE_ID.upper(), PARENT_ID)
