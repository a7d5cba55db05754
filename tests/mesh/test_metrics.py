"""The mesh's Prometheus metrics: names, bounded labels, no per-instance series."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from svantic_mesh.metrics import MeshMetrics, outcome_label

NAMES = (
    "svantic_dispatches_total",
    "svantic_open_websockets",
    "svantic_dispatch_latency_seconds",
    "svantic_routing_latency_seconds",
    "svantic_event_loop_lag_seconds",
    "svantic_orphan_terminal_frames_total",
    "svantic_tool_calls_total",
)


def _exercise(m: MeshMetrics) -> None:
    m.dispatch_finished("ws", None, 0.01)
    m.dispatch_finished("ws", "DEADLINE_EXCEEDED", 30.0)
    m.dispatch_finished("callback", "ok", 0.2)
    m.dispatch_finished("callback", "SOME_NEW_CODE_FROM_AN_AGENT", 0.2)
    m.routing_decision(3e-6)
    m.websocket_opened()
    m.websocket_opened()
    m.websocket_closed()
    m.loop_lag(0.004)
    m.orphan_terminal()
    m.tool_call(None)
    m.tool_call("TOOL_DEPTH_EXCEEDED")


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_render_has_every_metric() -> None:
    m = MeshMetrics()
    _exercise(m)
    content_type, body = m.render()
    assert content_type.startswith("text/plain")
    text = body.decode()
    for name in NAMES:
        assert name in text
    samples = _samples(body)
    assert samples[("svantic_dispatches_total", (("outcome", "ok"), ("transport", "ws")))] == 1
    key = ("svantic_dispatches_total", (("outcome", "deadline_exceeded"), ("transport", "ws")))
    assert samples[key] == 1
    key = ("svantic_dispatches_total", (("outcome", "other"), ("transport", "callback")))
    assert samples[key] == 1
    assert samples[("svantic_open_websockets", ())] == 1
    assert samples[("svantic_event_loop_lag_seconds", ())] == 0.004
    assert samples[("svantic_orphan_terminal_frames_total", ())] == 1
    assert samples[("svantic_tool_calls_total", (("outcome", "tool_depth_exceeded"),))] == 1
    assert ("svantic_routing_latency_seconds_bucket", (("le", "1e-06"),)) in samples


def test_no_per_instance_labels() -> None:
    m = MeshMetrics()
    _exercise(m)
    allowed = {"transport", "outcome", "le"}
    for family in text_string_to_metric_families(m.render()[1].decode()):
        for s in family.samples:
            assert set(s.labels) <= allowed, (s.name, s.labels)


def test_two_meshes_do_not_collide() -> None:
    a, b = MeshMetrics(), MeshMetrics()
    a.orphan_terminal()
    assert _samples(b.render()[1])[("svantic_orphan_terminal_frames_total", ())] == 0


def test_outcome_label_is_bounded() -> None:
    assert outcome_label(None) == "ok"
    assert outcome_label("OK") == "ok"
    assert outcome_label("DISPATCH_FAILED") == "dispatch_failed"
    assert outcome_label("cancelled") == "cancelled"
    assert outcome_label("x" * 500) == "other"
