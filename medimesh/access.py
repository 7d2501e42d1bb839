"""Who may call the oracle, how often, and how many live feeds: the rules, without I/O.

The oracle (``medimesh.actors.oracle``) applies these in one ASGI middleware; this module holds
the decisions so they are tested in milliseconds and written once:

- :class:`AccessPolicy` — the token (None: no token asked), the rate limits, the cap on open
  ``/events`` streams and how long an ``/audit/verify`` answer is reused. ``AccessPolicy.local()``
  is the loopback default (no token, no rate limits); :func:`policy_for` picks the policy for a
  bind address, as ``medimesh serve`` and ``medimesh demo`` do.
- :func:`token_matches` — constant-time comparison of a presented bearer token.
- :class:`RateLimiter` — one token bucket per client address (answer: seconds to wait).
- :class:`StreamSlots` — counts open ``/events`` streams, in total and per client address.
- :class:`VerifyCache` — when a cached ``/audit/verify`` answer may be served again.

Every function takes the clock as an argument; nothing here reads it, the network or files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EXEMPT_PATHS",
    "TOKEN_ENV",
    "AccessPolicy",
    "Limit",
    "RateLimiter",
    "StreamSlots",
    "VerifyCache",
    "bearer_token",
    "is_loopback",
    "limit_group",
    "policy_for",
    "token_matches",
]

TOKEN_ENV = "MEDIMESH_API_TOKEN"
"""The environment variable a token is read from (server and clients)."""

EXEMPT_PATHS = frozenset({"/health"})
"""Paths answered without a token (liveness probes)."""


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, ``localhost``).

    ``0.0.0.0``, ``::`` and any other name or address count as facing the network.
    """
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_matches(expected: str, presented: str | None) -> bool:
    """Constant-time: both sides are hashed first, so neither content nor length leaks."""
    if presented is None:
        return False
    a = hashlib.sha256(expected.encode("utf-8", "surrogatepass")).digest()
    b = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(a, b)


@dataclass(frozen=True, slots=True)
class Limit:
    """A token bucket: ``rate`` requests per second on average, bursts of up to ``burst``."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)) or not self.burst >= 1:
            raise ValueError(f"a rate limit needs rate > 0 and burst >= 1, got {self}")


# The endpoints worth limiting: each costs a model evaluation, a database scan or a stream.
# Cheap reads (/ready, /vocabulary, /rounds, …) are not limited.
_GROUPS: tuple[tuple[str, str, bool], ...] = (
    # (group, path, prefix?)
    ("diagnose", "/diagnose", True),  # /diagnose and /diagnose/phenopacket
    ("verify", "/audit/verify", False),
    ("audit", "/audit", False),
    ("events", "/events", False),
)


def limit_group(path: str) -> str | None:
    """The rate-limit group a request path falls in (None: not limited)."""
    for group, prefix, is_prefix in _GROUPS:
        if path == prefix or (is_prefix and path.startswith(prefix + "/")):
            return group
    return None


DEFAULT_LIMITS: Mapping[str, Limit] = {
    "diagnose": Limit(rate=20.0, burst=40.0),
    "verify": Limit(rate=0.5, burst=5.0),
    "audit": Limit(rate=10.0, burst=60.0),  # the dashboard pages the trail 500 rows at a time
    "events": Limit(rate=1.0, burst=10.0),  # stream openings, not events
}


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """What the oracle asks of its callers.

    ``token``: the bearer token every path but ``/health`` requires (None: none asked).
    ``limits``: token buckets per group (see :func:`limit_group`), per client address; empty:
    no rate limits. ``max_streams`` / ``max_streams_per_client``: open ``/events`` streams
    beyond these get 503. ``verify_max_age``: an ``/audit/verify`` answer is reused while the
    chain head is unchanged and it is younger than this; ``verify_min_interval``: never
    recomputed more often than this, even when the head moves (the answer says for which head
    and when it was computed).
    """

    token: str | None = None
    limits: Mapping[str, Limit] = dataclasses.field(default_factory=dict)
    max_streams: int = 64
    max_streams_per_client: int = 8
    verify_max_age: float = 30.0
    verify_min_interval: float = 2.0

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < 16:
            raise ValueError("an API token needs at least 16 characters")
        if self.max_streams < 1 or self.max_streams_per_client < 1:
            raise ValueError("stream caps must be at least 1")
        if self.verify_max_age < 0 or self.verify_min_interval < 0:
            raise ValueError("verify cache times must be >= 0")
        unknown = set(self.limits) - {g for g, _, _ in _GROUPS}
        if unknown:
            raise ValueError(f"unknown rate-limit groups {sorted(unknown)}")

    @classmethod
    def local(cls) -> AccessPolicy:
        """Loopback default: no token, no rate limits, a short verify cache; 64 streams in
        all (every local client shares one address, so no per-address cap)."""
        return cls(max_streams_per_client=64, verify_max_age=5.0, verify_min_interval=0.0)

    @classmethod
    def exposed(cls, token: str) -> AccessPolicy:
        """Facing the network: the token on every path but /health, and the default limits."""
        return cls(token=token, limits=dict(DEFAULT_LIMITS))

    @property
    def requires_token(self) -> bool:
        return self.token is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for a Serve replica's constructor)."""
        return {
            "token": self.token,
            "limits": {g: [lim.rate, lim.burst] for g, lim in self.limits.items()},
            "max_streams": self.max_streams,
            "max_streams_per_client": self.max_streams_per_client,
            "verify_max_age": self.verify_max_age,
            "verify_min_interval": self.verify_min_interval,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AccessPolicy:
        return cls(
            token=d.get("token"),
            limits={g: Limit(float(r), float(b)) for g, (r, b) in d.get("limits", {}).items()},
            max_streams=int(d.get("max_streams", 64)),
            max_streams_per_client=int(d.get("max_streams_per_client", 8)),
            verify_max_age=float(d.get("verify_max_age", 30.0)),
            verify_min_interval=float(d.get("verify_min_interval", 2.0)),
        )


def policy_for(host: str, token: str | None, require_token: bool) -> AccessPolicy:
    """The policy for a bind address: a token (and limits) beyond loopback, or when forced.

    ``token``: the one to use when a token is required (the caller resolves it: explicit flag,
    ``$MEDIMESH_API_TOKEN`` or a generated file). Raises ValueError when one is required and
    none was given, so a network-facing oracle never starts open.
    """
    needed = require_token or token is not None or not is_loopback(host)
    if not needed:
        return AccessPolicy.local()
    if token is None:
        raise ValueError(f"binding {host} needs an API token")
    return AccessPolicy.exposed(token)


# ------------------------------------------------------------------------------ rate limits


class RateLimiter:
    """Token buckets keyed by client address; remembers at most ``max_clients`` (LRU).

    Forgetting a client gives it a full bucket again, so ``max_clients`` bounds memory, not
    fairness: keep it well above the number of clients you expect.
    """

    def __init__(self, limit: Limit, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (tokens, at)

    def take(self, client: str, now: float) -> float:
        """Spend one token: 0.0 if allowed, else the seconds until one is available."""
        tokens, at = self._buckets.pop(client, (self.limit.burst, now))
        tokens = min(self.limit.burst, tokens + max(0.0, now - at) * self.limit.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.limit.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


# ------------------------------------------------------------------------------ event streams


class StreamSlots:
    """Open ``/events`` streams: at most ``total`` in all and ``per_client`` per address."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._open: dict[str, int] = {}

    @property
    def in_use(self) -> int:
        return sum(self._open.values())

    def acquire(self, client: str) -> str | None:
        """Take a slot; None if taken, else why not (for the 503's detail)."""
        if self.in_use >= self.total:
            return f"all {self.total} live-feed streams are open; try again later"
        if self._open.get(client, 0) >= self.per_client:
            return (f"this address already holds {self.per_client} live-feed streams "
                    "(the per-client cap)")
        self._open[client] = self._open.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        n = self._open.get(client, 0) - 1
        if n > 0:
            self._open[client] = n
        else:
            self._open.pop(client, None)


# ------------------------------------------------------------------------------ verify cache


@dataclass(frozen=True, slots=True)
class _Cached:
    head: str
    computed_at: float  # the caller's clock (monotonic in the oracle)
    answer: Mapping[str, Any]


class VerifyCache:
    """Decides whether ``/audit/verify`` must recompute, and holds the last answer.

    Reuse while the chain head is unchanged and the answer is younger than ``max_age``
    (a rewrite that leaves the head alone is still caught within ``max_age``); recompute on a
    new head, but not more often than every ``min_interval`` seconds.
    """

    def __init__(self, max_age: float, min_interval: float) -> None:
        self.max_age = max_age
        self.min_interval = min_interval
        self._last: _Cached | None = None
        self.computations = 0

    def cached(self, head: str, now: float) -> Mapping[str, Any] | None:
        """The answer to serve now without recomputing, or None (recompute)."""
        last = self._last
        if last is None:
            return None
        age = now - last.computed_at
        if age < self.min_interval:
            return last.answer
        if last.head == head and age < self.max_age:
            return last.answer
        return None

    def put(self, head: str, now: float, answer: Mapping[str, Any]) -> None:
        self._last = _Cached(head, now, answer)
        self.computations += 1

    def computed_at(self) -> float | None:
        return None if self._last is None else self._last.computed_at
