"""`svantic demo` tells the whole story on every adapter: the reference mesh, a connected and a
hosted agent registered through the control plane, dispatches over HTTPS (echo, a streamed count,
a failure, invalid arguments), a tool call between the agents, a TCP cut with resume and one
handler run, the fleet's stats, and the commands to try next. Real TLS on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


STEPS = (
    "connected agent: token, register, wss",
    "hosted agent: token, serve, register",
    "echo on the connected agent",
    "echo on the hosted agent",
    "count n=3, streamed (SSE)",
    "fail on the hosted agent",
    "count with invalid arguments",
    "tool call: connected ask -> hosted echo",
    "hold, socket cut mid-dispatch",
    "fleet: POST /agents/get_connection_stats",
    "both agents disconnect",
)


@pytest.mark.parametrize("command", [["svantic_mesh.cli", "demo"], ["svantic_mesh.demo"]])
@pytest.mark.parametrize("adapter", ["asyncio", "anyio", "gevent"])
def test_demo_tells_the_whole_story(adapter: str, command: list[str]) -> None:
    # A subprocess per adapter: gevent's patching and hub, and asyncio's loop, stay out of
    # this process; `svantic demo` and `python -m svantic_mesh.demo` are the same command.
    done = subprocess.run(
        [sys.executable, "-m", *command, "--adapter", adapter],
        capture_output=True, text=True, timeout=90, check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Traceback" not in out + done.stderr, out + done.stderr
    assert "UNEXPECTED" not in out
    assert f"(adapter {adapter})" in out
    assert re.search(r"mesh listening on https://127\.0\.0\.1:\d+ \(TLS", out), out
    lines = {line.strip().split("  ")[0]: line for line in out.splitlines()}
    for step in STEPS:
        assert step in lines, f"no step {step!r} in:\n{out}"
        assert re.search(r"\d+\.\d ms", lines[step]), lines[step]
    assert 'result {"hello":"demo-hosted"}' in out
    assert 'chunks [{"i":0},{"i":1},{"i":2}] then [{"count":3}]' in out
    assert "HTTP 422 DISPATCH_FAILED" in out
    assert "HTTP 422 INVALID_ARGUMENTS" in out
    assert '"answer":{"from":"demo-connected"}' in out
    assert "resumed, result" in out
    assert "2 instances; connected 1, hosted 1" in out
    assert "deregistered" in lines["both agents disconnect"]
    assert "hold handler ran 1 time(s) across the cut; result delivered once: yes" in out
    tail = out[out.index("try next"):]
    for next_command in ("svantic mesh", "svantic agent examples.demo_agent:agent",
                         "svantic call echo"):
        assert f"\n  {next_command}" in tail, tail


def test_cli_help_and_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "svantic_mesh.cli", "--version"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0 and "svantic-proto" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "svantic_mesh.cli", "demo", "--help"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0 and "--adapter" in done.stdout, done.stdout + done.stderr


def test_the_drivers_no_longer_carry_the_demo() -> None:
    """The demo uses the mesh and the SDK: an application, which a driver must not import."""
    assert not (ROOT / "adapters" / "cli.py").exists()
    assert importlib.util.find_spec("svantic_adapters.cli") is None


@pytest.mark.parametrize("adapter", ["anyio", "gevent"])
def test_a_missing_extra_says_which_to_install(
    adapter: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """As without the extra installed: the import of its package fails. No traceback."""
    from svantic_mesh import cli

    monkeypatch.setitem(sys.modules, adapter, None)  # `import <adapter>` raises, as if absent
    monkeypatch.delitem(sys.modules, f"svantic_adapters.{adapter}", raising=False)
    assert cli.main(["demo", "--adapter", adapter]) == 2
    out, err = capsys.readouterr()
    assert f"pip install 'svantic-proto[{adapter}]'" in err
    assert "Traceback" not in out + err
    assert "mesh listening" not in out


def test_the_first_run_of_scripts_demo_says_it_builds_and_how_long() -> None:
    assert 'source "$(dirname "$0")/_env"' in (ROOT / "scripts" / "demo").read_text()
    env = (ROOT / "scripts" / "_env").read_text()
    first_run = re.search(r'echo "== first run: building[^=]*==', env.replace("\\\n", ""))
    assert first_run, "scripts/_env no longer announces its first run"
    assert re.search(r"\d+ to \d+ s|minute", first_run.group(0)), first_run.group(0)
