"""The two fuzzing profiles: a short one every CI run takes, and a long one run by hand.

Short (default): a few hundred examples per target, a few seconds each, so the fuzz targets
guard every change. Long: `SVANTIC_FUZZ_LONG=1` (examples per target from
`SVANTIC_FUZZ_EXAMPLES`, default 20,000), run before a release or after touching a parser:

    SVANTIC_FUZZ_LONG=1 python -m pytest -q -p no:randomly tests/fuzz \
        --hypothesis-show-statistics

Hypothesis keeps no example database here (`database=None`): a finding is reported with the
input that reproduces it, and a CI run never depends on what an earlier run found.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG = os.environ.get("SVANTIC_FUZZ_LONG", "") not in ("", "0")
EXAMPLES = int(os.environ.get("SVANTIC_FUZZ_EXAMPLES", "20000")) if LONG else 300

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not LONG,  # CI sees the same inputs each run; the long run explores
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
"""The settings every fuzz target runs with."""
