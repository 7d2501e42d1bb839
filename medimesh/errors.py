"""MediMesh's exception hierarchy.

Every error a caller can act on derives from :class:`MediMeshError`, so a CLI or API layer can
turn it into a clear message instead of a traceback. Envelope errors are typed so that a router,
validator or test can say *why* a message was refused.
"""

from __future__ import annotations

__all__ = [
    "BadMagic",
    "BadSignature",
    "ConfigError",
    "DecryptionFailed",
    "EnvelopeError",
    "MalformedEnvelope",
    "MalformedPayload",
    "MediMeshError",
    "NotARecipient",
    "NotEnrolled",
    "PeerUnreachable",
    "QuorumNotReached",
    "UnsupportedVersion",
]


class MediMeshError(Exception):
    """Base class of every MediMesh error."""


class ConfigError(MediMeshError, ValueError):
    """A configuration value or command-line argument is invalid."""


class EnvelopeError(MediMeshError):
    """An envelope could not be parsed, authenticated or decrypted."""


class BadMagic(EnvelopeError):
    """The bytes do not start with the MediMesh envelope magic."""


class UnsupportedVersion(EnvelopeError):
    """The envelope's major version is not one this build understands."""


class MalformedEnvelope(EnvelopeError):
    """Lengths, fields or header contents are inconsistent."""


class BadSignature(EnvelopeError):
    """An outer or inner Ed25519 signature does not verify."""


class NotARecipient(EnvelopeError):
    """The envelope is not addressed to the identity trying to open it."""


class DecryptionFailed(EnvelopeError):
    """A wrapped key or the ciphertext failed authenticated decryption."""


class MalformedPayload(MediMeshError):
    """A decrypted payload does not decode into the message it claims to be."""


class NotEnrolled(MediMeshError):
    """A peer id is not on the consortium roster (or has the wrong role)."""


class PeerUnreachable(MediMeshError):
    """The router knows no live route to the destination peer (AXL answers HTTP 502)."""


class QuorumNotReached(MediMeshError):
    """A round closed without the minimum number of accepted updates."""
