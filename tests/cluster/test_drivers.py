"""The waits the cluster's routines make, on asyncio: a carried dispatch's wait ends with its
outcome, or with TimeoutError at its bound (never a hang)."""

from __future__ import annotations

import asyncio

import pytest
from svantic_mesh.cluster import _AsyncioDriver


def test_wait_returns_the_outcome_or_times_out() -> None:
    async def scenario() -> None:
        driver = _AsyncioDriver("redis://127.0.0.1:1/0", 2)  # never connects here
        future = driver.future()
        asyncio.get_running_loop().call_later(0.01, driver.resolve, future, "outcome")
        assert await driver.wait(future, 5.0) == "outcome"
        late = driver.future()
        with pytest.raises(TimeoutError):
            await driver.wait(late, 0.05)
        driver.resolve(late, "too late")  # a late outcome is dropped, nothing raises
        await driver.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))
