"""One command for every benchmark: pinned, interleaved, repeated, recorded.

    .venv/bin/python benchmarks/run_all.py              # full run, about 12 min on 2 CPUs
    .venv/bin/python benchmarks/run_all.py --quick      # smoke run: figures not meaningful
    .venv/bin/python benchmarks/run_all.py --readme     # README block from the latest results
    .venv/bin/python benchmarks/run_all.py --no-c-extension  # as installed without a C compiler

Every bench script runs as a subprocess with `--json PATH`, pinned with `os.sched_setaffinity`:
"one-cpu" is the whole run on the first allowed CPU, "split" is the whole run allowed every CPU
(bench_split, bench_scale and the loopback memory run then pin their processes one by one;
bench_mesh leaves them to the kernel; see PLACEMENT_NOTES). The jobs run round-robin, `--processes`
times (each time in a rotated order, with another interleaving seed), and every figure is reported
as the median over the processes with min and max. Before starting, the load average and a
one-second CPU-idle sample from /proc/stat are checked: a busy machine makes the harness refuse to
run, unless `--allow-busy`, when the results say so in `busy` (and the README block says so too).
Writes benchmarks/results/<YYYY-MM-DD>.json and two PNG charts next to it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
IDLE_MIN = 0.85  # fraction of CPU time idle in the sample before the run
LOAD_MAX = 0.5  # 1-minute load average per CPU


@dataclass(frozen=True)
class Job:
    name: str
    script: str
    placement: str  # "one-cpu" or "split"
    full: tuple[str, ...]
    quick: tuple[str, ...]
    seeded: bool = True

    @property
    def key(self) -> str:
        return f"{self.name}@{self.placement}"


JOBS = (
    Job("codec", "bench_codec.py", "one-cpu", ("--repeats", "9"), ("--quick",)),
    Job("auth", "bench_auth.py", "one-cpu", ("--repeats", "5"), ("--quick",)),
    Job("framing", "bench_framing.py", "one-cpu", ("--repeats", "7"),
        ("--messages", "500", "--repeats", "2"), seeded=False),
    Job("roundtrip", "bench_roundtrip.py", "one-cpu", ("--repeats", "20"), ("--quick",)),
    Job("routing", "bench_routing.py", "one-cpu", ("--repeats", "5"), ("--quick",),
        seeded=False),
    Job("sdk", "bench_sdk.py", "one-cpu", ("--repeats", "9"), ("--quick",)),
    Job("loopback", "bench_loopback.py", "one-cpu",
        ("--idle", "0", "--repeats", "3", "--sequential", "1000", "--pipelined", "4000"),
        ("--quick", "--idle", "0")),
    Job("split", "bench_split.py", "split",
        ("--repeats", "3", "--sequential", "400", "--pipelined", "2000"),
        ("--quick", "--contenders", "asyncio,websockets", "--repeats", "1")),
    Job("loopback-memory", "bench_loopback.py", "split",
        ("--skip-round-trips", "--idle", "2000", "--idle-repeats", "1"),
        ("--skip-round-trips", "--quick"), seeded=False),
    Job("tls-memory", "bench_tls_memory.py", "one-cpu", ("--count", "2000"), ("--count", "50"),
        seeded=False),
    Job("mesh", "bench_mesh.py", "one-cpu",
        ("--repeats", "3", "--sequential", "2000", "--concurrent", "6400", "--warmup", "500",
         "--no-routing"), ("--quick", "--no-routing"), seeded=False),
    Job("mesh", "bench_mesh.py", "split",
        ("--repeats", "3", "--sequential", "2000", "--concurrent", "6400", "--warmup", "500",
         "--no-routing"), ("--quick", "--no-routing"), seeded=False),
    Job("scale", "bench_scale.py", "split", ("--agents", "2000"), ("--quick",), seeded=False),
)
ONCE = {"loopback-memory@split", "tls-memory@one-cpu", "scale@split"}
"""Memory and scale figures: one process is enough (and a 2,000-agent run takes a minute)."""

PLACEMENT_NOTES = {
    "loopback": "bench_loopback runs both ends in one process (asyncio, anyio: one event loop; "
                "gevent: one hub in a child), so client and server cannot be split: the whole "
                "run is pinned to one CPU. bench_split measures both placements.",
    "split": "bench_split runs each side of a round trip in its own process and pins them "
             "itself before each batch: one-cpu, both on the first allowed CPU; split, the "
             "driver (our mesh, an echo's client) on the first and the answerer (our agent, "
             "an echo's server) on the second.",
    "scale": "bench_scale pins the mesh process to the first allowed CPU and the agents' "
             "client processes to the second.",
    "loopback-memory": "the server child on the second CPU, the connecting client on the first "
                       "(the script pins them itself when allowed two CPUs).",
    "mesh": "one-cpu: mesh, agent, echo server and client all pinned to one CPU; split: all "
            "allowed every CPU, placed by the kernel (the script cannot pin them one by one).",
}


# --- the machine ---------------------------------------------------------------------------


def cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def busy_sample(seconds: float = 1.0) -> dict[str, Any]:
    idle0, total0 = cpu_times()
    time.sleep(seconds)
    idle1, total1 = cpu_times()
    idle = (idle1 - idle0) / max(total1 - total0, 1)
    load1 = os.getloadavg()[0]
    cpus = len(os.sched_getaffinity(0))
    return {"idle_fraction": round(idle, 3), "load1": load1, "cpus": cpus,
            "busy": idle < IDLE_MIN or load1 / cpus > LOAD_MAX}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def describe_build(python: str) -> dict[str, Any]:
    code = ("import json, os, sys, ssl, svantic_proto\n"
            "print(json.dumps({'compiled': bool(svantic_proto.COMPILED),\n"
            " 'speedups_loaded': 'svantic_proto._speedups' in sys.modules,\n"
            " 'SVANTIC_PURE_PYTHON': os.environ.get('SVANTIC_PURE_PYTHON'),\n"
            " 'SVANTIC_NO_C_EXTENSION': os.environ.get('SVANTIC_NO_C_EXTENSION'),\n"
            " 'openssl': ssl.OPENSSL_VERSION, 'python': sys.version.split()[0],\n"
            " 'executable': sys.executable}))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    build = json.loads(done.stdout)
    versions = {"python": build.pop("python"), "openssl": build.pop("openssl")}
    for package in ("svantic-proto", "msgspec", "websockets", "wsproto", "anyio", "trio",
                    "gevent", "pydantic", "PyJWT", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    executable = Path(build["executable"])  # no machine directories in a committed file
    build["executable"] = (str(executable.relative_to(ROOT)) if executable.is_relative_to(ROOT)
                           else executable.name)
    build["name"] = "compiled (mypyc)" if build["compiled"] else "pure Python (the sources)"
    return {"build": build, "versions": versions}


def describe_machine() -> dict[str, Any]:
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_allowed": sorted(os.sched_getaffinity(0)), "machine": platform.machine(),
            "kernel": platform.release()}


# --- running -------------------------------------------------------------------------------


def run_job(job: Job, index: int, quick: bool, folder: Path) -> dict[str, Any]:
    allowed = sorted(os.sched_getaffinity(0))
    cpus = set(allowed[:1]) if job.placement == "one-cpu" else set(allowed)
    out = folder / f"{job.key}-{index}.json"
    args = list(job.quick if quick else job.full)
    if job.seeded:
        args += ["--seed", str(index + 1)]
    command = [sys.executable, str(HERE / job.script), *args, "--json", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False,
                          timeout=900, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    seconds = time.perf_counter() - started
    record: dict[str, Any] = {"seconds": round(seconds, 2), "exit_code": done.returncode,
                              "cpus": sorted(cpus), "argv": args}
    if out.exists():
        document = json.loads(out.read_text(encoding="utf-8"))
        record.update(tables=document["tables"], data=document["data"])
    else:
        record["error"] = done.stderr[-2000:]
    return record


def spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def aggregate_tables(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each table and row by position; numeric cells as median with min-max over processes."""
    runs = [run for run in runs if "tables" in run]
    if not runs:
        return []
    out = []
    for t_index, table in enumerate(runs[0]["tables"]):
        rows = []
        for r_index, row in enumerate(table["rows"]):
            merged: dict[str, Any] = {}
            for key, value in row.items():
                if isinstance(value, float):
                    merged[key] = spread([
                        run["tables"][t_index]["rows"][r_index][key] for run in runs
                        if t_index < len(run["tables"])
                        and r_index < len(run["tables"][t_index]["rows"])
                        and isinstance(run["tables"][t_index]["rows"][r_index].get(key), float)])
                else:
                    merged[key] = value
            rows.append(merged)
        out.append({"title": table["title"], "header": table["header"], "rows": rows})
    return out


def summarize(jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures the charts and the README use, median with min-max over processes."""
    summary: dict[str, Any] = {}
    codec_runs = [r["data"] for r in jobs.get("codec@one-cpu", {}).get("runs", []) if "data" in r]
    if codec_runs:
        types: dict[str, Any] = {}
        for name, first in codec_runs[0]["types"].items():
            types[name] = {"bytes": first["bytes"], "floor_us": spread(
                [run["types"][name]["floor_us"] for run in codec_runs])}
            for cand in first["ratio_vs_floor"]:
                types[name][cand] = spread(
                    [run["types"][name]["ratio_vs_floor"][cand] for run in codec_runs])
        summary["codec_vs_floor"] = types
    loop_runs = [r["data"] for r in jobs.get("loopback@one-cpu", {}).get("runs", [])
                 if "data" in r]
    if loop_runs:
        loopback: dict[str, Any] = {}
        for adapter, modes in loop_runs[0]["round_trips"].items():
            for mode, first in modes.items():
                values = [run["round_trips"][adapter][mode] for run in loop_runs
                          if adapter in run["round_trips"]]
                loopback.setdefault(adapter, {})[mode] = {
                    "echo": first["echo"],
                    "ratio": spread([v["ratio"] for v in values]),
                    "ours_rt_per_s": spread([v["ours_rt_per_s"] for v in values]),
                    "echo_rt_per_s": spread([v["echo_rt_per_s"] for v in values]),
                }
        summary["loopback_one_cpu"] = loopback
    split_runs = [r["data"] for r in jobs.get("split@split", {}).get("runs", []) if "data" in r]
    if split_runs:
        summary["loopback_processes"] = {
            "comparisons": across_processes(split_runs, "comparisons", ("ours", "echo")),
            "uvloop_gains": across_processes(split_runs, "uvloop_gains", ("uvloop", "stock")),
            "labels": split_runs[0]["labels"], "sizes": split_runs[0]["sizes"],
        }
    scale = [r["data"] for r in jobs.get("scale@split", {}).get("runs", []) if "data" in r]
    if scale:
        summary["scale"] = scale[0]
    return summary


def across_processes(runs: list[dict[str, Any]], field: str,
                     names: tuple[str, str]) -> list[dict[str, Any]]:
    """Rows of `field` keyed by `names` and placement; each mode's per-process median ratio as
    median with min-max over the processes."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for run in runs:
        for row in run[field]:
            key = (row[names[0]], row[names[1]], row["placement"])
            entry = rows.setdefault(key, {names[0]: key[0], names[1]: key[1],
                                          "placement": key[2], "sequential": [],
                                          "pipelined": []})
            for mode in ("sequential", "pipelined"):
                if row.get(mode):
                    entry[mode].append(row[mode]["median"])
    return [{**entry, "sequential": spread(entry["sequential"]),
             "pipelined": spread(entry["pipelined"])} for entry in rows.values()]


def table_rows(jobs: dict[str, Any], key: str, title_start: str,
               column: str = "") -> list[dict[str, Any]]:
    for table in jobs.get(key, {}).get("aggregate", []):
        if table["title"].startswith(title_start) and (not column or column in table["header"]):
            return list(table["rows"])
    return []


# --- charts --------------------------------------------------------------------------------


def charts(result: dict[str, Any], stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    build = result["build"]["name"]
    busy = " (machine busy: see results)" if result["busy"]["busy"] else ""
    processes = result["summary"].get("loopback_processes")
    loopback = result["summary"].get("loopback_one_cpu")
    if processes:
        written.append(processes_chart(plt, processes, stem, f"{build}{busy}"))
    elif loopback:
        fig, ax = plt.subplots(figsize=(7, 4))
        adapters = list(loopback)
        for offset, mode in ((-0.2, "sequential"), (0.2, "pipelined")):
            meds = [loopback[a][mode]["ratio"]["median"] for a in adapters]
            lows = [m - loopback[a][mode]["ratio"]["min"] for m, a in zip(meds, adapters,
                                                                           strict=True)]
            highs = [loopback[a][mode]["ratio"]["max"] - m for m, a in zip(meds, adapters,
                                                                            strict=True)]
            ax.bar([i + offset for i in range(len(adapters))], meds, width=0.4, label=mode,
                   yerr=[lows, highs], capsize=4)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(adapters)), adapters)
        ax.set_ylabel("ours / websockets echo (round trips per s)")
        ax.set_title(f"Loopback, TLS, one CPU: median, min-max over processes\n{build}{busy}",
                     fontsize=9)
        ax.legend()
        fig.tight_layout()
        path = stem.with_name(stem.name + "-loopback.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    codec = result["summary"].get("codec_vs_floor")
    if codec:
        fig, ax = plt.subplots(figsize=(9, 4))
        names = list(codec)
        ours = "svantic_proto"
        meds = [codec[n][ours]["median"] for n in names]
        ax.bar(range(len(names)), meds, yerr=[
            [m - codec[n][ours]["min"] for m, n in zip(meds, names, strict=True)],
            [codec[n][ours]["max"] - m for m, n in zip(meds, names, strict=True)]], capsize=3)
        ax.axhline(1.25, color="red", linewidth=0.8, label="target 1.25x")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel("decode+encode / bare msgspec")
        ax.set_title(f"Codec vs bare msgspec per frame type: median, min-max\n{build}{busy}",
                     fontsize=9)
        ax.legend()
        fig.tight_layout()
        path = stem.with_name(stem.name + "-codec.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written


def processes_chart(plt: Any, processes: dict[str, Any], stem: Path, subtitle: str) -> str:
    """Ours / echo per adapter and echo, one panel per placement, sequential and pipelined."""
    labels = processes["labels"]
    placements = [p for p in ("one-cpu", "split")
                  if any(r["placement"] == p for r in processes["comparisons"])]
    fig, axes = plt.subplots(1, len(placements), figsize=(6 * len(placements), 4.8),
                             sharey=True, squeeze=False)
    for ax, placement in zip(axes[0], placements, strict=True):
        rows = [r for r in processes["comparisons"] if r["placement"] == placement]
        names = [f"{labels[r['ours']].removeprefix('ours, ')}\nvs {labels[r['echo']]}"
                 for r in rows]
        for offset, mode in ((-0.2, "sequential"), (0.2, "pipelined")):
            cells = [r[mode] for r in rows]
            meds = [c["median"] if c else 0.0 for c in cells]
            errors = [[m - c["min"] if c else 0.0 for m, c in zip(meds, cells, strict=True)],
                      [c["max"] - m if c else 0.0 for m, c in zip(meds, cells, strict=True)]]
            ax.bar([i + offset for i in range(len(rows))], meds, width=0.4, label=mode,
                   yerr=errors, capsize=3)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{placement}: " + ("both processes on one CPU" if placement == "one-cpu"
                                         else "driver and answerer on separate CPUs"),
                     fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("ours / echo (round trips per s)")
    fig.suptitle(f"Loopback, TLS, each side in its own process: median, min-max over processes"
                 f"\n{subtitle}", fontsize=9)
    fig.tight_layout()
    path = stem.with_name(stem.name + "-loopback.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


# --- the README block ----------------------------------------------------------------------


def fmt(cell: dict[str, float] | None, suffix: str = "x", digits: int = 2) -> str:
    if not cell:
        return "-"
    return (f"{cell['median']:.{digits}f}{suffix} ({cell['min']:.{digits}f}-"
            f"{cell['max']:.{digits}f})")


def readme_block(result: dict[str, Any], name: str) -> str:
    jobs, summary = result["jobs"], result["summary"]
    build = result["build"]
    intro = (
        f"Generated by `benchmarks/run_all.py --readme` from `benchmarks/results/{name}`: "
        f"{build['name']}, C extension `_speedups` "
        f"{'loaded' if build['speedups_loaded'] else 'NOT loaded'}, Python "
        f"{result['versions']['python']}, {result['machine']['cpu_model']}, "
        f"{result['machine']['cpu_count']} CPUs. Median (min-max) over "
        f"{result['processes']} processes. \"one CPU\": both sides of a round trip pinned "
        "to one CPU; \"split\": each on its own."
    )
    lines = textwrap.wrap(intro, 99, break_on_hyphens=False)
    if result["busy"]["busy"]:
        lines += ["", *textwrap.wrap(
            f"**Warning: the machine was busy** ({result['busy']['summary']}): read these "
            "figures as indicative.", 99, break_on_hyphens=False)]
    lines += ["", "| what | result |", "|---|---|"]
    codec = summary.get("codec_vs_floor", {})
    if codec:
        ours = {n: v["svantic_proto"]["median"] for n, v in codec.items()}
        worst = max(ours, key=ours.__getitem__)
        lines.append(f"| frame decode+encode vs bare msgspec (per type, median) | "
                     f"{min(ours.values()):.2f}x to {max(ours.values()):.2f}x "
                     f"(highest: {worst}); target 1.25x |")
    framing = [r["data"]["directions"] for r in jobs.get("framing@one-cpu", {}).get("runs", [])
               if r.get("data", {}).get("directions")]
    for direction in framing[0] if framing else ():
        ours_us = spread([f[direction]["us_per_message"]["svantic Framing"] for f in framing])
        ws_us = spread([f[direction]["us_per_message"]["websockets Protocol"] for f in framing])
        lines.append(f"| WebSocket framing, 300-byte text message sent and parsed, {direction} | "
                     f"{fmt(ours_us, ' µs')}; websockets' sans-IO core {fmt(ws_us, ' µs')} |")
    stamps = table_rows(jobs, "codec@one-cpu", "Stamping")
    if stamps:
        lines.append(f"| stamping a frame's UUID v7 `id` and `ts` | {fmt(stamps[0]['µs'], ' µs')}"
                     "; target 1 µs |")
    auth = {row["operation"]: row["µs per op"] for row in table_rows(jobs, "auth@one-cpu", "")
            if "operation" in row}
    if "ours mint+verify" in auth:
        lines.append(f"| HS256 dispatch-auth mint+verify | {fmt(auth['ours mint+verify'], ' µs')}"
                     f"; PyJWT {fmt(auth.get('PyJWT encode+decode'), ' µs')} |")
    for row in table_rows(jobs, "roundtrip@one-cpu", "Python"):
        if str(row.get("candidate", "")).startswith("ours"):
            lines.append(f"| dispatch round trip in memory, {row['candidate'][6:]} | "
                         f"{fmt(row['µs per round trip'], ' µs', 1)}, "
                         f"{fmt(row['x websockets echo'])} websockets' sans-IO echo |")
    for adapter, modes in summary.get("loopback_one_cpu", {}).items():
        lines.append(f"| loopback TLS round trips, {adapter} vs {modes['sequential']['echo']}, "
                     f"one process, one CPU | sequential {fmt(modes['sequential']['ratio'])}, "
                     f"pipelined {fmt(modes['pipelined']['ratio'])} |")
    processes = summary.get("loopback_processes")
    if processes:
        labels = processes["labels"]
        for row in processes["comparisons"]:
            lines.append(f"| loopback TLS round trips, {labels[row['ours']]} / "
                         f"{labels[row['echo']]}, two processes, {row['placement']} | "
                         f"sequential {fmt(row['sequential'])}, pipelined "
                         f"{fmt(row['pipelined'])}; target 1.0x |")
        for row in processes["uvloop_gains"]:
            lines.append(f"| uvloop / stock asyncio loop, {labels[row['stock']]}, "
                         f"{row['placement']} | sequential {fmt(row['sequential'])}, pipelined "
                         f"{fmt(row['pipelined'])} |")
    memory = table_rows(jobs, "loopback-memory@split", "Memory per idle")
    floor = table_rows(jobs, "tls-memory@one-cpu", "OpenSSL")
    if memory:
        parts = ", ".join(f"{row['adapter']} {fmt(row['RSS KiB / conn'], ' KiB', 1)}"
                          for row in memory)
        if floor:
            parts += f"; OpenSSL's floor {fmt(floor[0]['KiB'], ' KiB', 1)}"
        lines.append(f"| memory per idle TLS server connection | {parts} |")
    for placement in ("one-cpu", "split"):
        ratios = table_rows(jobs, f"mesh@{placement}", "", "throughput mesh / echo")
        if ratios:
            parts = ", ".join(f"{r['mode']} {fmt(r['throughput mesh / echo'])}" for r in ratios)
            lines.append(f"| `svantic mesh` HTTP dispatch throughput vs a uvicorn echo, "
                         f"{placement} | {parts} |")
    scale = summary.get("scale")
    if scale:
        connect, storm = scale["connect"], scale["storm"]
        dropped = sum(connect["mesh_log"].values())
        lines.append(f"| {connect['agents']:,} idle agents on one mesh process (asyncio, TLS, "
                     f"default timers) | connected in {connect['seconds']:.1f} s, "
                     f"{connect['rss_kib_per_agent']:.1f} KiB per agent, mesh idle CPU "
                     f"{100 * connect['idle_cpu_share']:.2f}%, {dropped} handshakes dropped "
                     "or refused |")
        if storm:
            lines.append(f"| reconnect storm of {storm['agents']:,} after a mesh restart "
                         f"(SIGKILL) | all back {storm['seconds_from_kill']:.1f} s after the "
                         f"kill ({storm['seconds_from_listening']:.1f} s after the new mesh "
                         f"listened); {sum(storm['mesh_log'].values())} handshakes dropped or "
                         "refused |")
    if result.get("quick"):
        lines += ["", "(quick run: figures not meaningful)"]
    return "\n".join(lines)


def latest_results(folder: Path = RESULTS) -> Path:
    files = sorted(p for p in folder.glob("*.json") if re.fullmatch(r"\d{4}-\d\d-\d\d", p.stem))
    if not files:
        raise SystemExit(f"no results in {folder}")
    return files[-1]


def rendered_readme(text: str, results: Path) -> str:
    result = json.loads(results.read_text(encoding="utf-8"))
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{readme_block(result, results.name)}\n{END}{tail}"


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, 2 processes")
    parser.add_argument("--processes", type=int, default=None,
                        help="processes per job, round-robin (default 5; quick 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--only", default=None, help="comma-separated job names")
    parser.add_argument("--allow-busy", action="store_true",
                        help="run on a busy machine, with a warning in the results")
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument("--no-c-extension", action="store_true",
                        help="SVANTIC_NO_C_EXTENSION=1 for every bench: without `_speedups`, "
                             "as on an install built without a C compiler")
    parser.add_argument("--readme", action="store_true",
                        help="only rewrite README.md's bench block from the latest results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.readme:
        README.write_text(rendered_readme(README.read_text(encoding="utf-8"),
                                          latest_results(args.out)), encoding="utf-8")
        print(f"README.md block rewritten from {latest_results(args.out)}")
        return 0
    if args.no_c_extension:  # inherited by describe_build's probe and every job
        os.environ["SVANTIC_NO_C_EXTENSION"] = "1"
    processes = args.processes or (2 if args.quick else 5)
    jobs = [j for j in JOBS if not args.only or j.name in args.only.split(",")]
    before = busy_sample()
    busy_note = (f"before the run: {before['idle_fraction']:.0%} idle over 1 s, load average "
                 f"{before['load1']:.2f} on {before['cpus']} CPUs")
    if before["busy"] and not args.allow_busy:
        print(f"refusing to run: the machine is busy ({busy_note}); --allow-busy to run anyway",
              file=sys.stderr)
        return 2
    if before["busy"]:
        print(f"WARNING: the machine is busy ({busy_note}); recorded in the results",
              file=sys.stderr)
    started = time.time()
    idle0, total0 = cpu_times()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    record: dict[str, dict[str, Any]] = {
        j.key: {"script": j.script, "placement": j.placement, "runs": []} for j in jobs}
    samples = [before]
    with tempfile.TemporaryDirectory(prefix="run-all-") as folder:
        for index in range(processes):
            order = jobs[index % len(jobs):] + jobs[:index % len(jobs)]
            for job in order:
                if index > 0 and job.key in ONCE:
                    continue
                print(f"[{time.time() - started:6.0f} s] process {index + 1}/{processes}: "
                      f"{job.key}", file=sys.stderr, flush=True)
                record[job.key]["runs"].append(run_job(job, index, args.quick, Path(folder)))
            samples.append(busy_sample(0.5))
    idle1, total1 = cpu_times()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks = os.sysconf("SC_CLK_TCK")
    ours = (children1.ru_utime + children1.ru_stime - children0.ru_utime - children0.ru_stime)
    used = (total1 - total0 - (idle1 - idle0)) / ticks
    others = max(used - ours, 0.0) / max(time.time() - started, 1e-9) / before["cpus"]
    busy = {
        "busy": any(s["busy"] for s in samples[:1]) or others > 1 - IDLE_MIN,
        "before": before, "between_rounds": samples[1:],
        "others_cpu_share_during_run": round(others, 3),
        "thresholds": {"idle_min": IDLE_MIN, "load1_per_cpu_max": LOAD_MAX},
    }
    busy["summary"] = (f"{busy_note}; other processes used about {others:.0%} of the CPUs "
                       "during the run")
    for key, entry in record.items():
        entry["aggregate"] = aggregate_tables(entry["runs"])
        base = key.split("@")[0]
        if base in PLACEMENT_NOTES:
            entry["placement_note"] = PLACEMENT_NOTES[base]
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["benchmarks/run_all.py", *(argv or sys.argv[1:])]),
        "quick": args.quick, "processes": processes,
        "runtime_s": round(time.time() - started, 1),
        **describe_build(sys.executable), "machine": describe_machine(), "busy": busy,
        "placements": {"one-cpu": "the whole job pinned to the first allowed CPU",
                       "split": "the whole job allowed every CPU"},
        "notes": list(PLACEMENT_NOTES.values()),
        "jobs": record,
    }
    result["summary"] = summarize(record)
    failed = [f"{k} #{i}" for k, e in record.items() for i, r in enumerate(e["runs"])
              if r["exit_code"] != 0 or "tables" not in r]
    result["failed_runs"] = failed
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / result["date"]
    if not args.no_charts:
        result["charts"] = charts(result, stem)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    print(readme_block(result, stem.with_suffix(".json").name))
    print(f"\nwrote {stem.with_suffix('.json')} in {result['runtime_s']:.0f} s"
          + (f"; failed runs: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
