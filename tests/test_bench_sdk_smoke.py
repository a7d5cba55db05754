"""The SDK overhead benchmark runs, and times the path it names.

A quick run is not a measurement: these tests check the harness. The SDK rows must go
through the real `AgentRuntime` with the agent's registry (handlers started by the runtime,
arguments validated, a `svantic.Context` built, every result read back by the mesh), the
core-only rows must not, and the report must carry every row the issue asks for.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_sdk  # noqa: E402


def test_quick_run_reports_every_path_ratio_and_step(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench_sdk.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "## SDK dispatch overhead" in out
    assert "pure Python" in out or "compiled core" in out  # which build the figures are from
    for kind in ("sync", "async"):
        assert f"handler(arguments, None)` | {kind} |" in out
        assert f"`AgentConnection.send_result` | {kind} |" in out
        assert f"`handler_returned`) | {kind} |" in out
    assert "SDK / direct call: **" in out
    for step in ("validation alone", "jsonschema-rs `is_valid` alone",
                 "`CapabilityRegistry.resolve`", "context construction alone: both",
                 "result frame", "the rest", "**SDK - direct call**"):
        assert step in out, step
    assert "cycle collector per dispatch" in out
    assert "run_in_executor" in out


def test_sdk_rows_run_the_runtime_and_core_rows_do_not() -> None:
    loop = asyncio.new_event_loop()
    try:
        rig = bench_sdk.Rig(bench_sdk.make_agent())
        candidates = bench_sdk.rig_candidates(rig, loop)
        runs = rig.runtime.handler_runs
        for name in ("sdk sync", "sdk async"):
            assert candidates[name](150) > 0  # two batches; each result checked by the mesh
            assert rig.runtime.handler_runs == runs + 150
            runs += 150
        for name in ("core sync", "core async", "direct sync", "direct async"):
            candidates[name](30)
        assert rig.runtime.handler_runs == runs
        assert not rig.runtime.running_handlers and not rig.pair.session.running
    finally:
        loop.close()


def test_the_check_proves_validation_and_the_sdk_context() -> None:
    loop = asyncio.new_event_loop()
    try:
        rig = bench_sdk.Rig(bench_sdk.make_agent())
        garbage = bench_sdk.check(rig, loop)  # raises unless both hold
    finally:
        loop.close()
    assert set(garbage) == {"core sync", "sdk sync", "core async", "sdk async"}


def test_the_arguments_meet_the_schema_and_the_schema_is_typical() -> None:
    import jsonschema_rs

    validator = jsonschema_rs.validator_for(bench_sdk.SCHEMA)
    assert validator.is_valid(bench_sdk.ARGUMENTS)
    properties = bench_sdk.SCHEMA["properties"]
    assert len(properties) == 4
    kinds = {key for spec in properties.values() for key in spec}
    assert {"pattern", "enum", "minimum", "maximum"} <= kinds
    assert any(spec["type"] == "array" for spec in properties.values())
    assert not validator.is_valid({**bench_sdk.ARGUMENTS, "max_comments": 101})
