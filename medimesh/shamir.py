"""Shamir secret sharing (Shamir 1979) of byte strings over the prime field GF(2^521 - 1).

Secure aggregation shares each hospital's 32-byte key material so that any ``threshold``
surviving hospitals can rebuild it for a hospital that dropped out, while fewer learn nothing
(a random polynomial of degree ``threshold - 1`` hides its constant term information-
theoretically). The Mersenne prime 2^521 - 1 holds a secret of up to 64 bytes (after a
length marker) in one element, so a 32-byte key is one polynomial, not one per byte.
Coefficients come from ``secrets``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping

from medimesh.errors import ConfigError

__all__ = ["PRIME", "SHARE_BYTES", "Share", "combine", "split"]

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8): one field element, big-endian
_MAX_SECRET = 64  # 0x01 marker + 64 bytes = 513 bits < 521

Share = tuple[int, bytes]
"""(x, y): the evaluation point 1..n and the 66-byte big-endian value of the polynomial."""


def _field_random(randbelow: Callable[[int], int]) -> int:
    return randbelow(PRIME)


def split(
    secret: bytes,
    n: int,
    threshold: int,
    randbelow: Callable[[int], int] = secrets.randbelow,
) -> list[Share]:
    """``n`` shares at x = 1..n; any ``threshold`` of them recover ``secret``.

    The secret's length is not hidden (it is fixed by the protocol: 32 bytes).
    """
    if not 1 <= threshold <= n:
        raise ConfigError(f"Shamir needs 1 <= threshold <= n, got threshold {threshold}, n {n}")
    if len(secret) > _MAX_SECRET:
        raise ConfigError(f"a secret holds at most {_MAX_SECRET} bytes")
    # A leading 0x01 keeps leading zero bytes of the secret through the int round trip.
    coeffs = [int.from_bytes(b"\x01" + secret, "big")]
    coeffs += [_field_random(randbelow) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y.to_bytes(SHARE_BYTES, "big")))
    return shares


def combine(shares: Mapping[int, bytes] | list[Share], threshold: int) -> bytes:
    """Lagrange interpolation at 0 from at least ``threshold`` distinct shares.

    Too few shares, duplicate points or a malformed value raise ConfigError; a wrong share
    among them yields a wrong secret (detect that with a commitment, as the caller does).
    """
    items = list(shares.items()) if isinstance(shares, Mapping) else list(shares)
    xs = [x for x, _ in items]
    if len(set(xs)) != len(xs):
        raise ConfigError("duplicate share points")
    if len(items) < threshold:
        raise ConfigError(f"need {threshold} shares to reconstruct, have {len(items)}")
    pts = []
    for x, yb in items[:threshold]:
        if not 1 <= x < PRIME or len(yb) != SHARE_BYTES:
            raise ConfigError("malformed share")
        pts.append((x, int.from_bytes(yb, "big")))
    total = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    raw = total.to_bytes(SHARE_BYTES, "big").lstrip(b"\x00")
    if not raw or raw[0] != 1:
        raise ConfigError("shares do not reconstruct a well-formed secret")
    return raw[1:]
