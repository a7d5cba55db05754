"""The three baselines the codec benchmark compares `svantic_proto`'s codec with.

Each one is a `Baseline`: a name, a `decode(bytes | str)` and an `encode(frame)`.
The floor does no validation at all (it is what "free" costs); the other two
apply every rule of spec sections 2 and 3 and raise `FrameError` with the close
code the spec assigns, so they can be checked against the conformance vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from . import pydantic_v2, stdlib_json

__all__ = ["BASELINES", "FLOOR", "PYDANTIC", "STDLIB", "Baseline"]


@dataclass(frozen=True)
class Baseline:
    name: str
    decode: Callable[[Any], Any]
    encode: Callable[[Any], bytes]
    # False only for the floor, which accepts any JSON.
    validates: bool


# 1. The floor: bare msgspec to and from dicts, no validation and no wrapper call,
#    so that "within 1.25x of the floor" means "validation costs at most 25%".
FLOOR = Baseline("msgspec dict (floor)", msgspec.json.decode, msgspec.json.encode, False)
# 2. stdlib json + hand-written checks.
STDLIB = Baseline("stdlib json", stdlib_json.decode, stdlib_json.encode, True)
# 3. pydantic v2 discriminated union.
PYDANTIC = Baseline("pydantic v2", pydantic_v2.decode, pydantic_v2.encode, True)

BASELINES: tuple[Baseline, ...] = (FLOOR, STDLIB, PYDANTIC)
