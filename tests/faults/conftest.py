"""The fault and load tests (issue 17): the `load` marker, and their helpers on the path.

The helpers (`proxy.py`, `faults_harness.py`) and the processes they start
(`faults_mesh.py`, `faults_agents.py`) sit beside the tests and are imported by name.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Registered in pyproject.toml too; here so that this folder runs on its own anyway.
    config.addinivalue_line(
        "markers", "load: many connections or long fault runs (tests/faults)")
