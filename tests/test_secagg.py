"""Secure aggregation: Shamir, quantization bound, dropout recovery, what the server sees."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable

import numpy as np
import pytest

from medimesh import shamir
from medimesh.errors import ConfigError
from medimesh.identity import Identity
from medimesh.secagg import (
    Quantizer,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    prg,
    run_protocol,
)

# chi2.ppf(0.999, 255): a byte histogram of uniform data exceeds it with probability 1e-3.
CHI2_999_255 = 330.52


def _det_bytes(label: str) -> Callable[[int], bytes]:
    """Deterministic key material for reproducible tests (production uses os.urandom)."""
    counter = itertools.count()

    def randbytes(n: int) -> bytes:
        return hashlib.shake_256(f"{label}/{next(counter)}".encode()).digest(n)

    return randbytes


def _federation(n: int, seed: int = 0) -> tuple[list[str], dict[str, Identity]]:
    ids = [Identity.from_seed(hashlib.sha256(f"h{seed}/{i}".encode()).digest()) for i in range(n)]
    return [i.peer_id for i in ids], {i.peer_id: i for i in ids}


def _inputs(n: int, dim: int, clip: float, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i + 1: rng.uniform(-clip, clip, dim) for i in range(n)}


# ------------------------------------------------------------------------------------ shamir


def test_any_threshold_shares_recover_the_secret() -> None:
    """Every 3-subset of 5 shares rebuilds the key, leading zero bytes included."""
    secret = b"\x00\x00" + bytes(range(30))
    shares = shamir.split(secret, 5, 3)
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(list(subset), 3) == secret


def test_fewer_than_threshold_shares_are_refused() -> None:
    """t - 1 shares are not enough; duplicate points are an error, not a silent answer."""
    shares = shamir.split(b"k" * 32, 5, 3)
    with pytest.raises(ConfigError):
        shamir.combine(shares[:2], 3)
    with pytest.raises(ConfigError):
        shamir.combine([shares[0], shares[0], shares[1]], 3)
    with pytest.raises(ConfigError):
        shamir.split(b"k", 3, 4)


def test_threshold_minus_one_shares_are_consistent_with_any_secret() -> None:
    """Perfect hiding: for two different secrets, t-1 share values can coincide exactly.

    With threshold 2 the polynomial is secret + a*x; choosing a' = a + (s - s') makes the
    share at x = 1 identical, so one share says nothing about which secret it belongs to.
    """
    s1, s2 = b"\x01" * 32, b"\x02" * 32
    a = 12345
    delta = int.from_bytes(b"\x01" + s1, "big") - int.from_bytes(b"\x01" + s2, "big")
    coins = iter([a, (a + delta) % shamir.PRIME])
    one = shamir.split(s1, 3, 2, randbelow=lambda _p: next(coins))
    two = shamir.split(s2, 3, 2, randbelow=lambda _p: next(coins))
    assert one[0] == two[0] and one[1] != two[1]


# ------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize(("n", "clip"), [(1, 1.0), (4, 0.5), (10, 3.0), (300, 1e-3)])
def test_quantized_sum_is_within_the_stated_bound(n: int, clip: float) -> None:
    """|decoded sum - exact sum| <= n / (2 scale) per coordinate, and never wraps."""
    q = Quantizer(clip, n)
    rng = np.random.default_rng(n)
    xs = rng.uniform(-clip, clip, (n, 2000))
    xs[0, :4] = [clip, -clip, clip, -clip]  # the range's edges
    total = np.zeros(2000, dtype=np.uint64)
    for x in xs:
        total += q.encode(x)
    assert int(total.max()) < 2**32
    err = np.abs(q.decode_sum(total, n) - xs.sum(axis=0))
    assert float(err.max()) <= q.error_bound(n)
    assert q.error_bound(n) <= n * clip / 2 ** (q.bits - 1)  # the bound is explicit and small


def test_values_outside_the_range_are_clipped_not_wrapped() -> None:
    """Out-of-range inputs saturate at +-R instead of wrapping around the modulus."""
    q = Quantizer(1.0, 2)
    dec = q.decode_sum(q.encode(np.array([5.0, -5.0])).astype(np.uint64), 1)
    assert np.allclose(dec, [1.0, -1.0], atol=q.error_bound(1))


def test_prg_is_the_chacha20_key_stream() -> None:
    """RFC 8439 A.1 test vector #1 (zero key, zero nonce): masks come from ChaCha20."""
    words = prg(b"\0" * 32, 4)
    assert words.astype("<u4").tobytes().hex() == "76b8e0ada0f13d90405d6ae55386bd28"


# -------------------------------------------------------------------------------- protocol


def test_sum_equals_plaintext_sum_up_to_quantization() -> None:
    """No dropouts: the unmasked sum matches the plaintext sum within the bound."""
    peers, ids = _federation(5)
    params = SecAggParams.for_dropout(peers, 0.2, 300, 1.0, round_=1)
    xs = _inputs(5, 300, 1.0)
    res = run_protocol(params, ids, xs, randbytes=_det_bytes("a"))
    assert res.included == (1, 2, 3, 4, 5)
    err = np.abs(res.total - sum(xs.values()))
    assert float(err.max()) <= params.quantizer.error_bound(5)


def test_thirty_percent_dropouts_among_ten_hospitals_are_recovered() -> None:
    """3 of 10 vanish after sharing keys: their pairwise masks are rebuilt from shares."""
    peers, ids = _federation(10)
    params = SecAggParams.for_dropout(peers, 0.3, 200, 1.0, round_=2)
    assert params.threshold == 7
    xs = _inputs(10, 200, 1.0, seed=1)
    res = run_protocol(params, ids, xs, drop_before_masking=frozenset({2, 5, 9}))
    assert res.included == (1, 3, 4, 6, 7, 8, 10)
    exact = sum(xs[i] for i in res.included)
    assert float(np.abs(res.total - exact).max()) <= params.quantizer.error_bound(7)


def test_dropouts_after_sending_their_masked_update_are_still_counted() -> None:
    """3 of 10 send their masked vector, then vanish: their self-masks are rebuilt."""
    peers, ids = _federation(10)
    params = SecAggParams.for_dropout(peers, 0.3, 200, 1.0, round_=2)
    xs = _inputs(10, 200, 1.0, seed=2)
    res = run_protocol(params, ids, xs, drop_after_masking=frozenset({1, 4, 8}))
    assert res.included == tuple(range(1, 11))
    exact = sum(xs.values())
    assert float(np.abs(res.total - exact).max()) <= params.quantizer.error_bound(10)


def test_more_dropouts_than_the_threshold_allows_fail_loudly() -> None:
    """4 of 10 gone with t = 7: no sum, a SecAggError (never a wrong sum)."""
    peers, ids = _federation(10)
    params = SecAggParams.for_dropout(peers, 0.3, 50, 1.0)
    xs = _inputs(10, 50, 1.0)
    with pytest.raises(SecAggError):
        run_protocol(params, ids, xs, drop_before_masking=frozenset({1, 2}),
                     drop_after_masking=frozenset({3, 4}))


def test_threshold_must_exceed_half_the_hospitals() -> None:
    """t <= n/2 would let two disjoint groups each unmask: refused."""
    peers, _ = _federation(4)
    with pytest.raises(SecAggError):
        SecAggParams(tuple(peers), 2, 10, Quantizer(1.0, 4))
    with pytest.raises(SecAggError):
        SecAggParams.for_dropout(peers, 0.5, 10, 1.0)


def _byte_chi2(words: np.ndarray) -> float:
    counts = np.bincount(words.astype("<u4").view(np.uint8), minlength=256).astype(float)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_single_masked_update_is_indistinguishable_from_random() -> None:
    """The coordinator's view of one hospital's vector passes a uniformity test for any input.

    All-zero and all-maximum inputs give masked vectors whose byte histograms are uniform
    (chi-square below the 0.999 quantile), while the same inputs quantized but unmasked fail
    the test by orders of magnitude: the test has power, the masks remove it.
    """
    peers, ids = _federation(3, seed=7)
    dim = 20_000
    params = SecAggParams.for_dropout(peers, 0.0, dim, 1.0, round_=5)
    for fill in (0.0, 1.0):
        xs = {i: np.full(dim, fill) for i in (1, 2, 3)}
        res = run_protocol(params, ids, xs, randbytes=_det_bytes(f"v{fill}"))
        view = np.frombuffer(res.masked_views[1][10:-64], dtype="<u4")
        assert view.size == dim
        assert _byte_chi2(view) < CHI2_999_255
        assert _byte_chi2(params.quantizer.encode(xs[1])) > 100 * CHI2_999_255
        assert float(np.abs(res.total - fill * 3).max()) <= params.quantizer.error_bound(3)


def test_a_tampered_masked_vector_is_refused() -> None:
    """Masked vectors are signed by the hospital: a flipped bit is a SecAggError."""
    peers, ids = _federation(3)
    params = SecAggParams.for_dropout(peers, 0.0, 8, 1.0)
    clients = {i + 1: SecAggClient(params, ids[p]) for i, p in enumerate(peers)}
    server = SecAggServer(params)
    blob = server.collect_adverts({i: c.advertise() for i, c in clients.items()})
    inbox = server.route_shares({i: c.share_keys(blob) for i, c in clients.items()})
    masked = {i: c.masked_input(np.zeros(8), inbox[i]) for i, c in clients.items()}
    bad = bytearray(masked[2])
    bad[12] ^= 1
    with pytest.raises(SecAggError):
        server.collect_masked({**masked, 2: bytes(bad)})


def test_a_hospital_answers_unmasking_once_so_both_shares_never_leak() -> None:
    """A second request (e.g. naming a different survivor set) is refused: the server can
    never collect both the self-mask share and the mask-key share of one hospital."""
    peers, ids = _federation(5)
    params = SecAggParams.for_dropout(peers, 0.2, 8, 1.0)  # t = 4
    clients = {i + 1: SecAggClient(params, ids[p]) for i, p in enumerate(peers)}
    server = SecAggServer(params)
    blob = server.collect_adverts({i: c.advertise() for i, c in clients.items()})
    inbox = server.route_shares({i: c.share_keys(blob) for i, c in clients.items()})
    for i, c in clients.items():
        c.masked_input(np.zeros(8), inbox[i])
    clients[1].unmask([1, 2, 3, 4, 5])  # reveals hospital 5's self-mask share
    with pytest.raises(SecAggError):
        clients[1].unmask([1, 2, 3, 4])  # would reveal hospital 5's mask-key share
