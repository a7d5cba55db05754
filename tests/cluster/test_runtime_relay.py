"""The mesh runtime's side of a resume on another process: a dispatch it did not send can
be waited for (`adopt`), and one it sent can be ended from elsewhere (`deliver_chunk`,
`settle`), each once."""

from __future__ import annotations

from typing import Any

from svantic_proto.mesh_runtime import MeshRuntime


class Waiter:
    def __init__(self) -> None:
        self.results: list[Any] = []
        self.errors: list[BaseException] = []

    def set_result(self, value: Any) -> None:
        self.results.append(value)

    def set_exception(self, error: BaseException) -> None:
        self.errors.append(error)


def test_adopted_dispatch_gets_numbered_chunks_and_one_outcome() -> None:
    runtime: MeshRuntime[Any] = MeshRuntime(dispatch_auth=None, wall_clock=lambda: 0.0)
    waiter, chunks = Waiter(), []
    runtime.adopt("d-1", waiter, chunks.append)
    runtime.deliver_chunk("d-1", 0, "a")
    runtime.deliver_chunk("d-1", 0, "a")  # sent again after a resume: dropped
    runtime.deliver_chunk("d-1", 1, "b")
    assert chunks == [(0, "a"), (1, "b")]
    assert runtime.waiting() == 1
    assert runtime.settle("d-1", result={"ok": True})
    assert waiter.results == [{"ok": True}] and runtime.waiting() == 0
    assert not runtime.settle("d-1", result="again")  # ended once
    assert waiter.results == [{"ok": True}]


def test_settle_with_an_error_fails_the_waiter_with_its_code() -> None:
    runtime: MeshRuntime[Any] = MeshRuntime(dispatch_auth=None, wall_clock=lambda: 0.0)
    waiter = Waiter()
    runtime.adopt("d-2", waiter)
    assert runtime.settle("d-2", error=("DISPATCH_FAILED", "the handler failed"))
    assert [getattr(e, "code", None) for e in waiter.errors] == ["DISPATCH_FAILED"]
    assert not runtime.settle("unknown", result=1)
