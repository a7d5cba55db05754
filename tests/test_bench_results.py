"""The README's benchmark block is the latest results file's; `run_all.py --quick` works."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
RUN_ALL = ROOT / "benchmarks" / "run_all.py"


def load_run_all() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run_all", RUN_ALL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_readme_block_is_the_latest_results() -> None:
    run_all = load_run_all()
    latest = run_all.latest_results()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count(run_all.START) == 1 and readme.count(run_all.END) == 1
    assert readme == run_all.rendered_readme(readme, latest), (
        f"README.md's bench block is not what {latest.name} gives: run "
        "`.venv/bin/python benchmarks/run_all.py --readme`"
    )


def test_run_all_quick_writes_into_the_given_folder(tmp_path: Path) -> None:
    results = ROOT / "benchmarks" / "results"
    before = sorted(p.name for p in results.iterdir()) if results.exists() else []
    try:
        import matplotlib  # noqa: F401

        charts: list[str] = []
    except ImportError:
        charts = ["--no-charts"]
    done = subprocess.run(
        [sys.executable, str(RUN_ALL), "--quick", "--allow-busy", "--out", str(tmp_path),
         "--only", "codec,routing,loopback,split", *charts],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text(encoding="utf-8"))
    assert result["quick"] is True
    assert {"compiled", "speedups_loaded", "SVANTIC_PURE_PYTHON"} <= set(result["build"])
    assert {"python", "msgspec", "websockets", "anyio", "openssl"} <= set(result["versions"])
    assert result["machine"]["cpu_count"] >= 1
    assert "busy" in result["busy"]
    assert result["summary"]["codec_vs_floor"] and result["summary"]["loopback_one_cpu"]
    comparisons = result["summary"]["loopback_processes"]["comparisons"]
    assert {row["placement"] for row in comparisons} >= {"one-cpu"}  # split too, on 2 CPUs
    assert all(row["sequential"]["min"] <= row["sequential"]["median"] for row in comparisons)
    ratio = result["summary"]["codec_vs_floor"]["hello"]["svantic_proto"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"]
    if not charts:
        assert len(list(tmp_path.glob("*.png"))) == 2
    after = sorted(p.name for p in results.iterdir()) if results.exists() else []
    assert after == before
