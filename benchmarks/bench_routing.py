"""Routing benchmark: one routing decision costs the same at 10 and at 10,000 instances.

    python benchmarks/bench_routing.py            # a few seconds; a markdown table on stdout
    python benchmarks/bench_routing.py --quick    # a smoke run: figures not meaningful
    python benchmarks/bench_routing.py --check    # exit 1 if the target is missed

What is timed: `Router.acquire(tenant, capability, now=...)` then `Router.release(lease,
outcome="ok", ...)`, one pair per dispatch, on routers holding 10, 1,000 and 10,000
instances of one tenant that all offer the same capability, each already holding a
random number of leases (0 to 7, unlimited capacity, seeded), so the least-loaded choice
has real work to do. Each size is timed with `time.perf_counter` over N pairs; the best
of the repeats is reported, in µs per decision, with its ratio to the 10-instance router
measured in the same run.

Target: about 1.0x at every size (`--check` fails above 2.0x): the router keeps a heap
per (tenant, capability) of routable instances, so a decision is O(log n), not a scan;
what growth remains is that log n and cache misses over a 1,000 times larger working set.
`svantic_mesh` is never compiled: these are figures of the pure-Python build.
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


def build(size: int, seed: int) -> Router:
    """A router of `size` hosted instances offering CAPABILITY, with random leases held."""
    rng = random.Random(seed)
    router = Router()
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
        for _ in range(rng.randrange(8)):
            router.acquire(TENANT, CAPABILITY, instance_id=instance_id, now=0.0)
    return router


def time_pairs(router: Router, pairs: int) -> float:
    """Seconds for `pairs` acquire+release pairs."""
    acquire, release = router.acquire, router.release
    start = time.perf_counter()
    for _ in range(pairs):
        lease = acquire(TENANT, CAPABILITY, now=1.0)
        release(lease, outcome="ok", now=1.0, wall=WALL)
    return time.perf_counter() - start


def measure(pairs: int, repeats: int, seed: int) -> dict[int, float]:
    """Best µs per decision for each size; sizes alternate within a repeat so the
    machine's drift hits them alike."""
    routers = {size: build(size, seed) for size in SIZES}
    for router in routers.values():
        time_pairs(router, min(pairs, 1_000))  # warm up
    best = dict.fromkeys(SIZES, float("inf"))
    for _ in range(repeats):
        for size, router in routers.items():
            best[size] = min(best[size], time_pairs(router, pairs) / pairs * 1e6)
    return best


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny loop counts (smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per repeat (20000)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the leases held")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pairs = args.pairs or (200 if args.quick else 20_000)
    repeats = args.repeats or (2 if args.quick else 5)
    best = measure(pairs, repeats, args.seed)
    base = best[SIZES[0]]
    print("## Routing: acquire + release, least-loaded choice\n")
    print(
        f"Python {platform.python_version()}, pure-Python build, best of {repeats} repeats "
        f"of {pairs} pairs{' (quick: figures not meaningful)' if args.quick else ''}.\n"
    )
    print(f"| instances | µs per decision | vs {SIZES[0]} |")
    print("|---:|---:|---:|")
    for size in SIZES:
        print(f"| {size:,} | {best[size]:.2f} | {best[size] / base:.2f}x |")
    worst = max(best[size] / base for size in SIZES)
    met = worst <= RATIO_TARGET
    print(
        f"\nlargest ratio **{worst:.2f}x** (target about 1.0x, at most {RATIO_TARGET:.1f}x: "
        f"{'met' if met else 'MISSED'})"
    )
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
