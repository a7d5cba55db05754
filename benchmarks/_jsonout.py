"""`--json PATH` for the bench scripts: the figures a script prints, as data.

A script's stdout is left as it is; with `--json PATH` it is also captured, and every markdown
table in it is written to PATH as a list of rows (a dict per row, keyed by the header; cells
that read as numbers, such as `1,234`, `0.91x`, `12%`, `3.4 µs`, become numbers). A script
may add raw figures of its own in a module-level dict named `JSON_DATA` (written as "data").
`benchmarks/run_all.py` reads these files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

NUMBER = re.compile(r"^\*{0,2}(-?[\d,]*\.?\d+)\s*(x|%|µs|ms|s|KiB|MiB|B)?\*{0,2}$")


def cell_value(text: str) -> Any:
    """`0.91x` -> 0.91, `5,215` -> 5215.0; anything else stays text."""
    match = NUMBER.match(text.strip())
    if match is None:
        return text.strip()
    return float(match.group(1).replace(",", ""))


def parse_tables(text: str) -> list[dict[str, Any]]:
    """Every markdown table in `text`, with the last heading or line of text before it."""
    tables: list[dict[str, Any]] = []
    title = ""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        if line.startswith("|") and index + 1 < len(lines) and lines[index + 1].startswith("|-"):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            rows: list[dict[str, Any]] = []
            index += 2
            while index < len(lines) and lines[index].strip().startswith("|"):
                cells = [cell.strip() for cell in lines[index].strip().strip("|").split("|")]
                rows.append({key: cell_value(cell)
                             for key, cell in zip(header, cells, strict=False)})
                index += 1
            tables.append({"title": title, "header": header, "rows": rows})
            continue
        if line:
            title = line.lstrip("#").strip()
        index += 1
    return tables


class _Tee(io.TextIOBase):
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.captured = io.StringIO()

    def write(self, text: str) -> int:
        self.captured.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def run_main(main: Callable[[], int | None]) -> int:
    """Run a script's `main()`; with `--json PATH` in sys.argv, also write its figures."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--json", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:])
    if known.json is None:
        return main() or 0
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        code = main() or 0
    text = tee.captured.getvalue()
    document = {
        "script": Path(sys.argv[0]).name,
        "argv": [arg for arg in sys.argv[1:]],
        "exit_code": code,
        "tables": parse_tables(text),
        "data": getattr(sys.modules["__main__"], "JSON_DATA", {}),
        "stdout": text,
    }
    Path(known.json).write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n",
                                encoding="utf-8")
    return code

