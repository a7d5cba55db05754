"""The core is sans-IO: importing it loads no I/O, event loop or thread module, and its
source reads no clock (STYLE: "wall-clock reads hidden in pure code" are the trap).

gevent must patch `socket`, `ssl`, `select` and `threading` before anything imports
them, so an adapter may import `svantic_proto` first only if the core imports none of
them; `import jwt` pulls in `ssl` and `socket`, hence PyJWT is imported lazily.
In the standard library, `logging`, `subprocess`, `concurrent.futures` and `queue`
import `threading`; the core and its dependencies (h11, wsproto, msgspec) use none.
`random` and `secrets` are allowed: they read the OS entropy source, never the clock.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "svantic_proto"
FORBIDDEN_MODULES = [
    "socket", "ssl", "select", "selectors", "asyncio", "anyio", "trio", "gevent",
    "threading", "jwt",
]

_PROBE = """
import importlib, json, pkgutil, sys
import svantic_proto
for info in pkgutil.walk_packages(svantic_proto.__path__, "svantic_proto."):
    importlib.import_module(info.name)
after_import = sorted(m for m in {forbidden} if m in sys.modules)
{session}
after_session = sorted(m for m in {forbidden} if m in sys.modules)
print(json.dumps({{"import": after_import, "session": after_session}}))
"""

# A whole session through the public test kit: HS256 dispatch auth (mint and verify),
# handshake, dispatch, chunks, result, timers, close, resume. Lazy imports would show here.
_SESSION = """
from svantic_proto.testing import Pair
pair = Pair()
pair.connect()
dispatch_id = pair.mesh.send_dispatch("echo", {"x": 1}, deadline_ms=5000, now=pair.clock.now)
pair.pump()
pair.agent.send_chunk(dispatch_id, 1)
pair.agent.send_result(dispatch_id, 2)
pair.pump()
pair.advance(100)
pair.cut()
pair.reconnect()
pair.mesh.close_request(now=pair.clock.now)
pair.pump()
"""


def _probe() -> dict[str, list[str]]:
    code = _PROBE.format(forbidden=FORBIDDEN_MODULES, session=_SESSION)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, list[str]] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_importing_and_running_the_core_loads_no_io_module() -> None:
    loaded = _probe()
    assert loaded["import"] == [], f"importing svantic_proto loaded {loaded['import']}"
    assert loaded["session"] == [], f"a session through the core loaded {loaded['session']}"


# -- no clock reads in the source ----------------------------------------------------------------

CLOCK_MODULES = {"time"}
"""Nothing in `time` is needed by a core that takes `now` as an argument."""
CLOCK_ATTRIBUTES = {
    "time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns",
    "sleep", "now", "utcnow", "today", "uuid1",
}
"""Called as `<anything>.<name>()`: `time.time()`, `datetime.now()`, `date.today()`, ..."""
CORE_FILES = sorted(CORE.rglob("*.py"))


def _clock_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name in CLOCK_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if node.module in CLOCK_MODULES:
                found.append(f"from {node.module} import ...")
            found += [
                f"from {node.module} import {a.name}"
                for a in node.names
                if a.name in CLOCK_ATTRIBUTES
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in CLOCK_ATTRIBUTES
        ):
            found.append(f"line {node.lineno}: .{node.func.attr}()")
    return found


@pytest.mark.parametrize("path", CORE_FILES, ids=[p.name for p in CORE_FILES])
def test_core_source_reads_no_clock(path: Path) -> None:
    assert _clock_uses(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import time",
        "from time import monotonic",
        "from datetime import datetime\nx = datetime.now()",
        "import datetime\nx = datetime.datetime.utcnow()",
        "import time as t\nt.sleep(1)",
        "from datetime import date\nd = date.today()",
    ],
)
def test_the_scan_finds_clock_reads(snippet: str) -> None:
    assert _clock_uses(snippet)
