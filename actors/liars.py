"""Dishonest hospital actors for the operator bench and its tests (never started by a run).

A liar is the production :class:`~medimesh.actors.hospital.Hospital`, unchanged, whose every
sealed message first passes through :func:`medimesh.setup_lies.lie`: it holds its own enrolled
key and real patients, and lies only about the numbers it reports. Wrapped from outside, so
the production hospital has no branch for lying.
"""

from __future__ import annotations

from typing import Any, ClassVar

from medimesh.actors.hospital import Hospital
from medimesh.protocol import Message
from medimesh.setup_lies import lie

__all__ = ["LIARS", "Liar"]


class Liar(Hospital):
    """A hospital that reports ``LIE`` (a key of :data:`medimesh.setup_lies.LIES`)."""

    LIE: ClassVar[str] = ""

    def seal(self, msg: Message, recipients: list[str], round_: int) -> bytes:
        told: Any = lie(msg, self.LIE)
        return super().seal(told, recipients, round_)


class NanSum(Liar):
    LIE = "nan_sum"


class HugeSumSq(Liar):
    LIE = "huge_sumsq"


class NanClassCounts(Liar):
    LIE = "nan_class_counts"


class InflatedN(Liar):
    LIE = "inflated_n"


class InflatedEval(Liar):
    LIE = "inflated_eval"


LIARS: dict[str, type[Hospital]] = {
    c.LIE: c for c in (NanSum, HugeSumSq, NanClassCounts, InflatedN, InflatedEval)
}
