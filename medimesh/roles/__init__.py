"""Sans-IO protocol roles: decoded messages in, effects out (the h11 / wsproto style).

A role object holds one party's protocol state and decides what that party does; it never
sends, sleeps, reads a clock it was not handed, or touches Ray, HTTP or a database. Its
callers are the thin shells: the Ray actors in ``actors/`` and the standalone node runtime
(``medimesh node ...``). A shell feeds a role what arrived and carries out the effects it
returns, in order. So each role's logic exists once, whatever runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medimesh.protocol import Message

__all__ = ["Effect", "Record", "Send", "SendRaw"]


@dataclass(frozen=True, slots=True)
class Send:
    """Seal ``msg`` to ``to`` (peer ids) for round ``round`` and hand it to the transport.

    ``wait``: the shell waits for the transport's answer (AXL's 200 / 502) before it goes on;
    otherwise it posts and learns of refusals later (``Transport.failures``).
    """

    msg: Message
    to: tuple[str, ...]
    round: int
    wait: bool = False


@dataclass(frozen=True, slots=True)
class SendRaw:
    """Hand an already sealed envelope to the transport (a retry of the same bytes)."""

    envelope: bytes


@dataclass(frozen=True, slots=True)
class Record:
    """Append a signed event to this party's audit outbox."""

    event: str
    round: int
    subject: str = ""
    body: Mapping[str, Any] = field(default_factory=dict)


Effect = Send | SendRaw | Record
