"""Routing benchmark: one routing decision costs the same at 10 and at 10,000 instances.

    python benchmarks/bench_routing.py            # a few seconds; markdown tables on stdout
    python benchmarks/bench_routing.py --quick    # a smoke run: figures not meaningful
    python benchmarks/bench_routing.py --check    # exit 1 if the target is missed

What is timed: `Router.acquire(tenant, capability, now=...)` then `Router.release(lease,
outcome="ok", ...)`, one pair per dispatch, on routers holding 10, 1,000 and 10,000
instances of one tenant that all offer the same capability, each already holding leases
(unlimited capacity, seeded), so the least-loaded choice has real work to do. Each size is
timed with `time.perf_counter` over N pairs; the best of the repeats is reported, in µs
per decision, with its ratio to the 10-instance router measured in the same run.

Two load layouts, because the instances a run keeps touching are not the same number at
every size in the first:

* random loads: every instance holds 0 to 7 leases. The pairs go round robin over the
  instances at the lowest load: with the default seed 3 at 10 instances, 1,274 at 10,000,
  so the larger router also touches ~400 times more records, lease sets and dict slots (a
  larger working set for the CPU caches), though the routing work per decision is the
  same. The "round robin over" column shows that count for the seed used.
* same hot set: at every size exactly 10 instances (spread over the registration order)
  hold no lease and the others 1 to 7, so every size goes round robin over 10 instances:
  what is left is the cost of the router's structures themselves at that size.

Target: about 1.0x at every size (`--check` fails above 2.0x in either layout): the router
keeps its routable instances in buckets by lease count, so a decision is O(1), not a scan
or a heap operation. What growth remains in the first layout is cache misses over the
larger working set, not more work. `svantic_mesh` is never compiled: these are figures of
the pure-Python build.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from svantic_mesh.routing import Router  # noqa: E402

SIZES = (10, 1_000, 10_000)
RATIO_TARGET = 2.0
"""`--check` fails when the largest router costs more than this times the smallest."""

TENANT = "tenant_abc"
CAPABILITY = "get_ticket"
WALL = 1_700_000_000.0


HOT = 10
"""Instances at the lowest load, at every size, in the same hot set layout."""

LAYOUTS = ("random loads", "same hot set")


def build(size: int, seed: int, layout: str = LAYOUTS[0]) -> Router:
    """A router of `size` hosted instances offering CAPABILITY, with random leases held:
    0 to 7 each (random loads), or none on HOT of them and 1 to 7 on the rest (same hot
    set)."""
    rng = random.Random(seed)
    router = Router()
    spread = max(size // HOT, 1)
    for n in range(size):
        instance_id = f"agent-{n:05d}"
        router.upsert(
            instance_id,
            tenant_id=TENANT,
            agent_type="ticket" if n % 2 else "billing",
            deployment_mode="hosted",
            capabilities=(CAPABILITY, f"extra_{n % 7}"),
            max_concurrent_sessions=0,
            now=0.0,
        )
        if layout == LAYOUTS[0]:
            held = rng.randrange(8)
        else:
            held = 0 if n % spread == 0 and n // spread < HOT else rng.randrange(1, 8)
        for _ in range(held):
            router.acquire(TENANT, CAPABILITY, instance_id=instance_id, now=0.0)
    return router


def rotating(router: Router, size: int) -> int:
    """How many instances share the lowest load: those the timed pairs go round robin over."""
    loads = []
    for n in range(size):
        state = router.get(f"agent-{n:05d}")
        assert state is not None
        loads.append(state.active_sessions)
    return loads.count(min(loads))


def time_pairs(router: Router, pairs: int) -> float:
    """Seconds for `pairs` acquire+release pairs."""
    acquire, release = router.acquire, router.release
    start = time.perf_counter()
    for _ in range(pairs):
        lease = acquire(TENANT, CAPABILITY, now=1.0)
        release(lease, outcome="ok", now=1.0, wall=WALL)
    return time.perf_counter() - start


def measure(
    pairs: int, repeats: int, seed: int, layout: str
) -> tuple[dict[int, float], dict[int, int]]:
    """Best µs per decision for each size, and how many instances each size's pairs go
    round robin over; sizes alternate within a repeat so the machine's drift hits them
    alike."""
    routers = {size: build(size, seed, layout) for size in SIZES}
    hot = {size: rotating(router, size) for size, router in routers.items()}
    for router in routers.values():
        time_pairs(router, min(pairs, 1_000))  # warm up
    best = dict.fromkeys(SIZES, float("inf"))
    for _ in range(repeats):
        for size, router in routers.items():
            best[size] = min(best[size], time_pairs(router, pairs) / pairs * 1e6)
    return best, hot


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny loop counts (smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per repeat (20000)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the leases held")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the figures to PATH as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pairs = args.pairs or (200 if args.quick else 20_000)
    repeats = args.repeats or (2 if args.quick else 5)
    print("## Routing: acquire + release, least-loaded choice\n")
    print(
        f"Python {platform.python_version()}, pure-Python build, best of {repeats} repeats "
        f"of {pairs} pairs{' (quick: figures not meaningful)' if args.quick else ''}.\n"
    )
    met = True
    for layout in LAYOUTS:
        best, hot = measure(pairs, repeats, args.seed, layout)
        base = best[SIZES[0]]
        print(f"### {layout}\n")
        print(f"| instances | round robin over | µs per decision | vs {SIZES[0]} |")
        print("|---:|---:|---:|---:|")
        for size in SIZES:
            print(f"| {size:,} | {hot[size]:,} | {best[size]:.2f} | {best[size] / base:.2f}x |")
        worst = max(best[size] / base for size in SIZES)
        met_here = worst <= RATIO_TARGET
        met = met and met_here
        print(
            f"\nlargest ratio **{worst:.2f}x** (target about 1.0x, at most "
            f"{RATIO_TARGET:.1f}x: {'met' if met_here else 'MISSED'})\n"
        )
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _jsonout import run_main  # --json PATH: the same figures as JSON

    sys.exit(run_main(main))
