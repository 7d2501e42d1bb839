"""Signed AXL requests and the front's TLS certificate: pure logic, real Ed25519 (no Ray)."""

from __future__ import annotations

import pytest

from medimesh.axl_auth import (
    NONCE_HEADER,
    PEER_HEADER,
    SIGNATURE_HEADER,
    TIME_HEADER,
    AuthRefused,
    RequestAuth,
    SignedRequest,
    canonical,
    sign_request,
)
from medimesh.identity import Identity
from medimesh.tls import certificate_peer_id, front_certificate, server_context

A, B = Identity.generate(), Identity.generate()
T0 = 1_800_000_000.0


def _req(headers: dict[str, str], path: str = "/recv", body: bytes = b"") -> SignedRequest:
    return SignedRequest("GET", path, headers, body)


def test_a_signed_request_is_accepted_once() -> None:
    """The owner's signature passes; the same nonce again is a replay."""
    auth = RequestAuth()
    headers = sign_request(A, "GET", "/recv", now=T0)
    assert auth.check(_req(headers), A.peer_id, now=T0 + 1) == A.peer_id
    with pytest.raises(AuthRefused, match="replayed"):
        auth.check(_req(headers), A.peer_id, now=T0 + 2)
    assert auth.refused == 1


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: {k: v for k, v in h.items() if k != SIGNATURE_HEADER}, "unsigned"),
        (lambda h: {**h, PEER_HEADER: "zz"}, "64-hex"),
        (lambda h: {**h, PEER_HEADER: B.peer_id}, "belongs to"),
        (lambda h: {**h, TIME_HEADER: "soon"}, "number"),
        (lambda h: {**h, TIME_HEADER: "nan"}, "outside"),
        (lambda h: {**h, TIME_HEADER: f"{T0 + 31:.3f}"}, "outside"),
        (lambda h: {**h, NONCE_HEADER: "NOT-HEX!"}, "Nonce"),
        (lambda h: {**h, NONCE_HEADER: "ab" * 16}, "bad request signature"),
        (lambda h: {**h, SIGNATURE_HEADER: "00" * 64}, "bad request signature"),
        (lambda h: {**h, SIGNATURE_HEADER: "00"}, "128-hex"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(mutate: object, reason: str) -> None:
    headers = sign_request(A, "GET", "/recv", now=T0, nonce="cd" * 16)
    with pytest.raises(AuthRefused, match=reason):
        RequestAuth().check(_req(mutate(headers)), A.peer_id, now=T0)  # type: ignore[operator]


def test_the_signature_binds_method_path_and_body() -> None:
    """A signature moved to another path, method or body does not verify."""
    headers = sign_request(A, "GET", "/recv", b"", now=T0)
    auth = RequestAuth()
    for req in (_req(headers, "/topology"), SignedRequest("POST", "/recv", headers),
                _req(headers, body=b"x")):
        with pytest.raises(AuthRefused, match="bad request signature"):
            auth.check(req, A.peer_id, now=T0)
    assert canonical("get", "/p", A.peer_id, "1", "ab", b"").startswith(
        b"medimesh/axl-request/v1\nGET\n/p\n")


def test_skew_window_and_nonce_memory() -> None:
    """±30 s is accepted; nonces older than the window are forgotten (their time is stale
    anyway); a peer that fills its nonce memory is refused (fails closed), other peers not."""
    auth = RequestAuth(window_s=30, max_nonces_per_peer=2)
    assert auth.check(_req(sign_request(A, "GET", "/recv", now=T0 - 29)), A.peer_id, now=T0)
    assert auth.check(_req(sign_request(A, "GET", "/recv", now=T0 + 29)), A.peer_id, now=T0)
    with pytest.raises(AuthRefused, match="too many"):
        auth.check(_req(sign_request(A, "GET", "/recv", now=T0)), A.peer_id, now=T0)
    assert auth.check(_req(sign_request(B, "GET", "/recv", now=T0)), B.peer_id, now=T0)
    later = T0 + 61  # both remembered nonces are now older than twice the window
    assert auth.check(_req(sign_request(A, "GET", "/recv", now=later)), A.peer_id, now=later)


def test_front_certificate_carries_the_identity_and_is_deterministic() -> None:
    """The cert's key is the seed's peer id, the same bytes every time; it loads as a TLS
    server context."""
    cert, key = front_certificate(A.seed)
    assert certificate_peer_id(cert) == A.peer_id
    assert front_certificate(A.seed) == (cert, key)
    assert certificate_peer_id(front_certificate(B.seed)[0]) == B.peer_id
    assert server_context(A.seed).minimum_version.name == "TLSv1_3"


def test_roster_pin_is_the_one_router() -> None:
    """The pin a client needs comes from the roster: its only router's peer id."""
    from medimesh.axl import roster_pin
    from medimesh.errors import ConfigError
    from medimesh.identity import Member, Roster

    assert roster_pin(Roster([Member("r", "router", A.peer_id),
                              Member("h", "hospital", B.peer_id)])) == A.peer_id
    with pytest.raises(ConfigError, match="0 routers"):
        roster_pin(Roster([Member("h", "hospital", B.peer_id)]))
