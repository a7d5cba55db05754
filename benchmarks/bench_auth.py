"""Dispatch-auth benchmark: our HS256 `svantic_jwt` mint+verify against PyJWT, in one run.

    python benchmarks/bench_auth.py            # about 10 s; a markdown table on stdout
    python benchmarks/bench_auth.py --quick    # a smoke run: figures not meaningful
    python benchmarks/bench_auth.py --check    # exit 1 if the target is missed

What is timed, per operation, for one dispatch envelope (spec section 7 claims):

* ours: `DispatchAuthMinter.mint(...)` then `DispatchAuthVerifier.verify(...)`, with the
  wall time read once per dispatch by the caller (`time.time()`, inside the timing);
* PyJWT: `jwt.encode(claims, secret, "HS256")` then `jwt.decode(...)` configured alike
  (`algorithms=["HS256"]`, audience with `strict_aud`, issuer, leeway 5, every claim
  required) plus the `jti` / `cap` comparisons PyJWT cannot express;
  and, for reference, PyJWT with bare options (`algorithms` and `audience` only);
* the floor: one `hmac.digest(secret, signing_input, "sha256")` over the same bytes.

Target: ours costs at most one fifth of PyJWT (ratio <= 0.20). The machine's speed
drifts, so each repeat times every candidate back to back in a shuffled order, ratios
are taken within a repeat, and medians over the repeats are reported.
"""

from __future__ import annotations

import argparse
import hmac
import platform
import random
import statistics
import sys
import time
import timeit
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jwt  # noqa: E402

from svantic_proto.auth import DispatchAuthMinter, DispatchAuthVerifier  # noqa: E402

RATIO_TARGET = 0.20
"""Our mint+verify may cost at most this fraction of PyJWT's encode+decode."""

SECRET = "bench-signing-secret-0123456789abcdef"
INSTANCE = "navigator-prod-01"
AGENT_TYPE = "navigator"
TENANT = "tenant_abc"
DISPATCH = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f61"
CAPABILITY = "get_ticket"
REQUIRED = ["iss", "aud", "sub", "tenant_id", "jti", "cap", "iat", "exp"]


def candidates() -> dict[str, Callable[[], object]]:
    """Each candidate does one dispatch's worth of work and raises if it fails."""
    minter = DispatchAuthMinter(SECRET)
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET])
    secret_bytes = SECRET.encode()
    fixed_now = time.time()
    envelope = minter.mint(
        instance_id=INSTANCE,
        agent_type=AGENT_TYPE,
        tenant_id=TENANT,
        dispatch_id=DISPATCH,
        capability=CAPABILITY,
        now=fixed_now,
    )
    token = envelope["token"]
    signing_input = token.rsplit(".", 1)[0].encode()

    def ours_mint_verify() -> None:
        now = time.time()
        minted = minter.mint(
            instance_id=INSTANCE,
            agent_type=AGENT_TYPE,
            tenant_id=TENANT,
            dispatch_id=DISPATCH,
            capability=CAPABILITY,
            now=now,
        )
        verifier.verify(minted, dispatch_id=DISPATCH, capability=CAPABILITY, now=now)

    def ours_mint() -> None:
        minter.mint(
            instance_id=INSTANCE,
            agent_type=AGENT_TYPE,
            tenant_id=TENANT,
            dispatch_id=DISPATCH,
            capability=CAPABILITY,
            now=fixed_now,
        )

    def ours_verify() -> None:
        verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=fixed_now)

    def pyjwt_claims() -> dict[str, object]:
        issued_at = int(time.time())
        return {
            "iss": "svantic",
            "aud": INSTANCE,
            "sub": AGENT_TYPE,
            "tenant_id": TENANT,
            "jti": DISPATCH,
            "cap": CAPABILITY,
            "iat": issued_at,
            "exp": issued_at + 60,
        }

    def pyjwt_decode(pyjwt_token: str) -> None:
        claims = jwt.decode(
            pyjwt_token,
            SECRET,
            algorithms=["HS256"],
            audience=INSTANCE,
            issuer="svantic",
            leeway=5,
            options={"require": REQUIRED, "strict_aud": True},
        )
        if claims["jti"] != DISPATCH or claims["cap"] != CAPABILITY:
            raise AssertionError("PyJWT decoded the wrong dispatch")

    pyjwt_token = jwt.encode(pyjwt_claims(), SECRET, algorithm="HS256")

    def pyjwt_encode_decode() -> None:
        pyjwt_decode(jwt.encode(pyjwt_claims(), SECRET, algorithm="HS256"))

    def pyjwt_bare_encode_decode() -> None:
        jwt.decode(
            jwt.encode(pyjwt_claims(), SECRET, algorithm="HS256"),
            SECRET,
            algorithms=["HS256"],
            audience=INSTANCE,
        )

    def pyjwt_encode() -> None:
        jwt.encode(pyjwt_claims(), SECRET, algorithm="HS256")

    def pyjwt_decode_only() -> None:
        pyjwt_decode(pyjwt_token)

    def hmac_floor() -> None:
        hmac.digest(secret_bytes, signing_input, "sha256")

    return {
        "ours mint+verify": ours_mint_verify,
        "PyJWT encode+decode": pyjwt_encode_decode,
        "PyJWT encode+decode, bare options": pyjwt_bare_encode_decode,
        "HMAC-SHA256 floor": hmac_floor,
        "ours mint": ours_mint,
        "ours verify": ours_verify,
        "PyJWT encode": pyjwt_encode,
        "PyJWT decode": pyjwt_decode_only,
    }


def calibrate(function: Callable[[], object], seconds: float) -> int:
    """Loops that take about `seconds` (timeit's autorange, scaled)."""
    loops, elapsed = timeit.Timer(function).autorange()
    return max(1, int(loops * seconds / max(elapsed, 1e-9)))


def measure(
    repeats: int, seconds: float, fixed_loops: int | None, seed: int
) -> dict[str, list[float]]:
    """µs per op for every candidate, `repeats` times, shuffled within each repeat."""
    functions = candidates()
    for function in functions.values():
        function()  # fails loudly before timing anything
    loops = {
        name: fixed_loops or calibrate(function, seconds) for name, function in functions.items()
    }
    order = list(functions)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            elapsed = timeit.Timer(functions[name]).timeit(number=loops[name])
            samples[name].append(elapsed / loops[name] * 1e6)
    return samples


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny loop counts (smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 15; quick 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the interleaving order")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the figures to PATH as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT key-length advice is not what we time
        samples = measure(
            repeats,
            seconds=0.08,
            fixed_loops=200 if args.quick else None,
            seed=args.seed,
        )
    ours, pyjwt, floor = (
        samples["ours mint+verify"],
        samples["PyJWT encode+decode"],
        samples["HMAC-SHA256 floor"],
    )
    ratio = statistics.median(o / p for o, p in zip(ours, pyjwt, strict=True))
    over_floor = statistics.median(o / f for o, f in zip(ours, floor, strict=True))
    bare = samples["PyJWT encode+decode, bare options"]
    ratio_bare = statistics.median(o / b for o, b in zip(ours, bare, strict=True))
    print("## Dispatch auth: HS256 svantic_jwt mint + verify\n")
    print(
        f"Python {platform.python_version()}, PyJWT {jwt.__version__}, "
        f"{repeats} repeats{' (quick: figures not meaningful)' if args.quick else ''}; "
        "medians.\n"
    )
    print("| operation | µs per op |")
    print("|---|---:|")
    for name, values in samples.items():
        print(f"| {name} | {statistics.median(values):.2f} |")
    met = ratio <= RATIO_TARGET
    print(
        f"\nours / PyJWT = **{ratio:.3f}** (target <= {RATIO_TARGET:.2f}: "
        f"{'met' if met else 'MISSED'}); against PyJWT with bare options (algorithms and "
        f"audience only) {ratio_bare:.3f}; ours / one HMAC = {over_floor:.1f}x"
    )
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _jsonout import run_main  # --json PATH: the same figures as JSON

    sys.exit(run_main(main))
