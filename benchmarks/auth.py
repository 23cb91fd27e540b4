"""What checking a token costs per request: ``python -m benchmarks.auth --help``.

Measured in-process, keys cached (the realm is asked once, before the timing), one thread:

- ``appcore.auth.TokenVerifier`` on an RS256 token it has not seen (header, signature, claims,
  roles), and on one it verified before (remembered until it expires);
- a request through ``appcore.auth.AuthLayer`` in front of an ASGI app that answers at once, with a
  new token and with one seen before (role table look-up, verification, ``current_user``), against
  the same app behind the layer with authentication off, and against a refused request (a 401);

for 2048- and 4096-bit RSA keys (Keycloak's default is 2048). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from appcore.auth import AuthLayer, Realm, TokenVerifier
from tests.realm import ANNOTATOR, SigningKey
from tests.realm import Realm as StandInRealm


def _per_call_us(call: Callable[[], Any], repeats: int, rounds: int = 5) -> tuple[float, float]:
    """Median over ``rounds`` of the microseconds per call of ``repeats`` calls: CPU time of this
    process (what a check costs, whatever else the machine runs) and wall time."""
    call()
    cpu, wall = [], []
    for _ in range(rounds):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for _ in range(repeats):
            call()
        cpu.append((time.process_time() - start_cpu) / repeats * 1e6)
        wall.append((time.perf_counter() - start_wall) / repeats * 1e6)
    return statistics.median(cpu), statistics.median(wall)


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _request(layer: Any, headers: list[tuple[bytes, bytes]]) -> Callable[[], int]:
    scope = {"type": "http", "method": "GET", "path": "/info/", "root_path": "", "headers": headers}
    status = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    loop = asyncio.new_event_loop()

    def call() -> int:
        loop.run_until_complete(layer(dict(scope), receive, send))
        return status[-1]

    return call


def measure(bits: int, repeats: int) -> list[tuple[str, float, float]]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    stand_in = StandInRealm(
        keys=[SigningKey(rsa.generate_private_key(public_exponent=65537, key_size=bits), "k")], url="http://r"
    )

    def fetch(url: str, timeout_s: float) -> Any:
        if url.endswith("openid-configuration"):
            return {"jwks_uri": "http://r/certs"}
        if url.endswith("certs"):
            return {"keys": [k.jwk() for k in stand_in.keys]}
        return {"public_key": stand_in.keys[0].public_der_b64()}

    verifier = TokenVerifier(Realm("http://r", fetch=fetch))
    uncached = TokenVerifier(verifier.realm, cache_size=0)  # every request parses and verifies the token
    token = stand_in.token("anna", [ANNOTATOR])
    verifier.check(token)  # the keys, fetched once
    assert verifier.realm.fetches == 1
    kid = TokenVerifier.kid(token)
    keys = verifier.realm.cached_keys(kid)
    assert keys
    rows = [
        (
            f"verify a token not seen before (RSA {bits})",
            *_per_call_us(lambda: uncached.verify(token, keys, kid), repeats),
        ),
        (f"check a token verified before (RSA {bits})", *_per_call_us(lambda: verifier.check(token), repeats)),
    ]
    header = [(b"authorization", f"Bearer {token}".encode())]
    first_sight = _request(AuthLayer(_answer, uncached), header)
    again = _request(AuthLayer(_answer, verifier), header)
    off = _request(AuthLayer(_answer, None), [])
    refused = _request(AuthLayer(_answer, verifier), [])
    assert (first_sight(), again(), off(), refused()) == (200, 200, 200, 401)
    rows.append((f"request through the layer, new token (RSA {bits})", *_per_call_us(first_sight, repeats)))
    rows.append((f"request through the layer, token seen before (RSA {bits})", *_per_call_us(again, repeats)))
    rows.append(("request through the layer, authentication off", *_per_call_us(off, repeats)))
    rows.append(("request through the layer, no token (401)", *_per_call_us(refused, repeats)))
    assert verifier.realm.fetches == 1, "the keys stayed cached"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2000, help="calls per timing round (5 rounds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (nothing here uses them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.WARNING)  # the 401s would log one line each
    print(f"CPU: {platform.processor() or platform.machine()}; {args.repeats} calls x 5 rounds\n")
    print("| what | CPU time per request (median of 5 rounds) | wall time |")
    print("|---|---|---|")
    for bits in (2048, 4096):
        for what, cpu, wall in measure(bits, args.repeats):
            if bits == 4096 and "RSA" not in what:
                continue
            print(f"| {what} | {cpu:.1f} µs | {wall:.1f} µs |")


if __name__ == "__main__":
    main()
