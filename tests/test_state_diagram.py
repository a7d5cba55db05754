"""docs/state-machines.md is drawn from the transition tables, and the tables are the
ones the connections actually use (svantic_proto/states.py).
"""

from __future__ import annotations

import ast
import importlib.util
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from svantic_proto.states import (
    AGENT_TRANSITIONS,
    MESH_TRANSITIONS,
    AgentState,
    MeshState,
    mermaid_diagram,
)

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "state-machines.md"
SCRIPT = ROOT / "scripts" / "gen_state_diagram.py"
CORE = ROOT / "svantic_proto"
REGENERATE = "run `python scripts/gen_state_diagram.py` and commit docs/state-machines.md"

TABLES: dict[str, tuple[Any, type[Enum], list[str]]] = {
    "agent": (AGENT_TRANSITIONS, AgentState, ["connection.py", "agent.py"]),
    "mesh": (MESH_TRANSITIONS, MeshState, ["connection.py", "mesh.py"]),
}


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_state_diagram", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_matches_the_tables() -> None:
    expected = _load_script().render()
    current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
    assert current == expected, f"docs/state-machines.md is out of date: {REGENERATE}"


@pytest.mark.parametrize("machine", list(TABLES))
def test_page_shows_each_diagram_verbatim(machine: str) -> None:
    block = f"```mermaid\n{mermaid_diagram(TABLES[machine][0])}```"
    assert block in PAGE.read_text(encoding="utf-8"), REGENERATE


@pytest.mark.parametrize("machine", list(TABLES))
def test_every_state_is_reachable_and_can_close(machine: str) -> None:
    """No state is missing from the table, unreachable, or a dead end before CLOSED."""
    table, states, _ = TABLES[machine]
    assert list(table) == list(states), "one row per state, in declaration order"
    initial, closed = next(iter(states)), states["CLOSED"]
    assert table[closed] == {}, "CLOSED is final"
    for moves in table.values():
        assert set(moves.values()) <= set(states)
    reachable = {initial}
    frontier = [initial]
    while frontier:
        for target in table[frontier.pop()].values():
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(states)
    for state in states:
        if state is not closed:
            assert table[state].get("transport_lost") is closed, f"{state.name} survives no EOF"


def _moves_made(files: list[str]) -> set[str]:
    """Every literal `self._move("...")` in the given core modules."""
    made: set[str] = set()
    for name in files:
        for node in ast.walk(ast.parse((CORE / name).read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "_move"
            ):
                (argument,) = node.args
                assert isinstance(argument, ast.Constant), "moves are named by literals"
                assert isinstance(argument.value, str)
                made.add(argument.value)
    return made


@pytest.mark.parametrize("machine", list(TABLES))
def test_the_tables_name_exactly_the_moves_the_code_makes(machine: str) -> None:
    """A row the code never takes would put a false arrow in the diagram."""
    table, _, files = TABLES[machine]
    named = {what for moves in table.values() for what in moves}
    assert _moves_made(files) == named
