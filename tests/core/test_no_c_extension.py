"""`SVANTIC_NO_C_EXTENSION=1`: the build of an install without a C compiler, where it is built.

`_speedups` has no `.py` twin: without it, the codec checks strings with its regexes and the
framing and message layers mask with their pure-Python loops. The switch makes every import of
it fail, so the tests and the benchmarks can run that build; `svantic_proto.C_EXTENSION` says
which one runs. `tests/core` as a whole passes with the switch on, with or without
`SVANTIC_PURE_PYTHON=1`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import svantic_proto
from svantic_proto import _compiled

ROOT = Path(__file__).resolve().parents[2]
SWITCHED_ON = os.environ.get(_compiled.NO_C_EXTENSION_ENV, "") not in ("", "0")

PROBE = """\
import json, sys
import svantic_proto.codec
before = 'svantic_proto._speedups' in sys.modules
import svantic_proto as s
from svantic_proto import codec, framing, messages
from svantic_proto.codec import decode_frame
try:
    import svantic_proto._speedups
    importable = True
except ImportError:
    importable = False
ping = ('{"v":1,"type":"ping","id":"01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f60",'
        '"ts":"2026-11-21T10:00:00.123Z","payload":{}}')
decode_frame(ping)
print(json.dumps({
    "loaded_by_codec": before,
    "loaded": sys.modules.get('svantic_proto._speedups') is not None,
    "importable": importable,
    "flag": s.C_EXTENSION,
    "regex_check": codec._frame_ok is codec._frame_ok_re,
    "python_mask": framing._xor_mask is framing._xor_mask_py,
    "python_unmask": messages._unmask is messages._unmask_py,
}))
"""


def probe(switch: str | None) -> dict[str, bool]:
    env = {k: v for k, v in os.environ.items() if k != _compiled.NO_C_EXTENSION_ENV}
    if switch is not None:
        env[_compiled.NO_C_EXTENSION_ENV] = switch
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, bool] = json.loads(done.stdout)
    return result


def test_the_switch_drops_the_extension() -> None:
    """Whatever is installed: nothing imports `_speedups`, and every fallback runs."""
    assert probe("1") == {
        "loaded_by_codec": False, "loaded": False, "importable": False, "flag": False,
        "regex_check": True, "python_mask": True, "python_unmask": True,
    }


def test_zero_or_empty_means_whatever_is_installed() -> None:
    installed = probe(None)
    assert probe("0") == installed
    assert probe("") == installed
    # All of it, or none of it.
    assert installed["flag"] is installed["loaded"] is installed["importable"]
    assert installed["regex_check"] is installed["python_mask"] is (not installed["flag"])


def test_the_flag_says_what_this_process_runs() -> None:
    loaded = sys.modules.get("svantic_proto._speedups") is not None
    assert svantic_proto.C_EXTENSION is loaded
    if SWITCHED_ON:
        assert svantic_proto.C_EXTENSION is False
        with pytest.raises(ModuleNotFoundError, match=_compiled.NO_C_EXTENSION_ENV):
            importlib.import_module("svantic_proto._speedups")


def test_the_switch_is_documented() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## The compiled core\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section and "SVANTIC_NO_C_EXTENSION=1" in section.group(1)
    assert "svantic_proto.C_EXTENSION" in section.group(1)
    bench_readme = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    assert "SVANTIC_NO_C_EXTENSION=1" in bench_readme
    assert "--no-c-extension" in bench_readme


def _run_all() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_run_all_no_c", ROOT / "benchmarks" / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_harness_can_run_that_build(monkeypatch: pytest.MonkeyPatch) -> None:
    run_all = _run_all()
    assert run_all.parse_args(["--no-c-extension"]).no_c_extension is True
    assert run_all.parse_args([]).no_c_extension is False
    monkeypatch.setenv(_compiled.NO_C_EXTENSION_ENV, "1")
    build = run_all.describe_build(sys.executable)["build"]
    assert build["speedups_loaded"] is False
    assert build[_compiled.NO_C_EXTENSION_ENV] == "1"
