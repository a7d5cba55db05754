"""`svantic demo` runs end to end on every adapter: TLS, dispatches, a TCP cut, resume."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("adapter", ["anyio", "gevent"])
def test_a_missing_extra_says_which_to_install(
    adapter: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """As without the extra installed: the import of its package fails. No traceback."""
    from svantic_adapters import cli

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
