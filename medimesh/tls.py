"""TLS for the AXL front, pinned by the roster: the certificate's key IS a roster key.

The front presents a self-signed X.509 certificate whose Ed25519 key is the router's identity
(its 32-byte seed), so the roster already carries the pin: the router's peer id. A client
fetches the certificate, checks that its public key is the pinned peer id, and then connects
with that certificate as its only trust anchor (TLS 1.3 only, no hostname check: the name
that matters is the key). The handshake proves the server holds the key's secret, so a
man in the middle who replays the public certificate cannot finish it.

The certificate is a pure function of the seed (fixed names, serial and validity; Ed25519
signatures are deterministic), so a restarted front presents the same bytes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from medimesh.errors import ConfigError, MediMeshError

__all__ = [
    "TlsPinError",
    "certificate_peer_id",
    "fetch_certificate",
    "front_certificate",
    "pinned_context",
    "server_context",
]

_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


class TlsPinError(MediMeshError):
    """The server's certificate is not the one the roster pins (or there is none to check)."""


def _key(seed: bytes) -> Ed25519PrivateKey:
    if len(seed) != 32:
        raise ConfigError("a TLS identity seed is exactly 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(seed)


def front_certificate(seed: bytes) -> tuple[bytes, bytes]:
    """``(cert_pem, key_pem)``: the self-signed certificate of the identity ``seed``."""
    key = _key(seed)
    public = key.public_key().public_bytes_raw()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MediMesh"),
        x509.NameAttribute(NameOID.COMMON_NAME, "axl-front " + public.hex()[:16]),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(public).digest()[:16], "big") >> 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, None)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@contextlib.contextmanager
def _secret_files(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """Paths OpenSSL can read the pair from (Python's ssl loads keys from files only).

    Anonymous memory files on Linux, so the key never touches a disk; elsewhere a 0700
    temporary directory that is removed as soon as the context has loaded them.
    """
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fds = [os.memfd_create("medimesh-tls"), os.memfd_create("medimesh-tls")]
        try:
            for fd, data in zip(fds, (cert_pem, key_pem), strict=True):
                os.write(fd, data)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="medimesh-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        yield str(cert_path), str(key_path)


def server_context(seed: bytes) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting :func:`front_certificate` of ``seed``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with _secret_files(*front_certificate(seed)) as (cert_path, key_path):
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def certificate_peer_id(cert_pem: str | bytes) -> str:
    """The peer id (64 hex) of an Ed25519 certificate's key; TlsPinError for any other key."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    try:
        public = x509.load_pem_x509_certificate(data).public_key()
    except ValueError as exc:
        raise TlsPinError(f"the server's certificate cannot be read: {exc}") from None
    if not isinstance(public, Ed25519PublicKey):
        raise TlsPinError(
            f"the server's certificate has a {type(public).__name__} key, not the Ed25519 "
            "roster key a MediMesh front presents"
        )
    return public.public_bytes_raw().hex()


def fetch_certificate(host: str, port: int, timeout: float = 10.0) -> str:
    """The PEM certificate the server at ``host:port`` presents (not yet trusted)."""
    try:
        return ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError) as exc:
        raise TlsPinError(f"cannot fetch the TLS certificate of {host}:{port}: {exc}") from None


def pinned_context(
    host: str, port: int, peer_id: str, *, timeout: float = 10.0
) -> ssl.SSLContext:
    """A client context that trusts only the certificate of ``peer_id`` served at host:port.

    Raises TlsPinError naming both keys when the server presents another key.
    """
    pin = peer_id.strip().lower()
    cert_pem = fetch_certificate(host, port, timeout)
    presented = certificate_peer_id(cert_pem)
    if presented != pin:
        raise TlsPinError(
            f"TLS pin mismatch at {host}:{port}: the server presents key {presented}, "
            f"the roster pins {pin}"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the pinned key is the identity, not a DNS name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert_pem)
    return ctx

