"""`svantic demo` runs end to end on every adapter: TLS, dispatches, a TCP cut, resume."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("adapter", ["asyncio", "anyio", "gevent"])
def test_demo_runs_and_the_resumed_handler_ran_once(adapter: str) -> None:
    # A subprocess per adapter: gevent's hub and asyncio's loop stay out of this process.
    done = subprocess.run(
        [sys.executable, "-m", "svantic_adapters.cli", "demo", "--adapter", adapter],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "slow_report handler ran 1 time(s)" in done.stdout
    assert "DISPATCH_FAILED" in done.stdout
    assert "chunks ['sans', 'io', 'all', 'the', 'way', 'down']" in done.stdout


def test_cli_help_and_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "svantic_adapters.cli", "--version"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0 and "svantic-proto" in done.stdout
