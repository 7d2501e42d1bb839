"""The hospital actor: builds its own patients from a descriptor and never lets a row out."""

from __future__ import annotations

from typing import Any

import structlog

from medimesh.actors.base import Node
from medimesh.errors import EnvelopeError, MediMeshError
from medimesh.hospital import HospitalNode
from medimesh.protocol import (
    ModelPublished,
    RoundStart,
    SetupRequest,
    SetupResult,
    decode,
)
from medimesh.sites import SiteDescriptor, dataset_info, load_site
from medimesh.wire import open_envelope

__all__ = ["Hospital"]

log = structlog.get_logger("medimesh.hospital")


class Hospital(Node):
    """Answers setup, round and model messages from the coordinator, and nobody else."""

    def __init__(
        self,
        seed: bytes,
        roster_json: str,
        router: Any,
        auditor: Any,
        descriptor: SiteDescriptor,
        behaviour: str = "honest",
    ) -> None:
        super().__init__(seed, roster_json, router, auditor)
        data = load_site(descriptor)  # built here, inside the hospital's own process
        self._data_notes = {"skipped_rows": data.skipped_rows, "unknown_codes": data.unknown_codes}
        self._node = HospitalNode(data, dataset_info(descriptor.kind, descriptor.params))
        self._coordinator = self.roster.with_role("coordinator")[0].peer_id
        self._validator = self.roster.with_role("validator")[0].peer_id
        self._behaviour = behaviour
        self.rounds_trained = 0

    def info(self) -> dict[str, Any]:
        """Counts only: what the runtime and /network may know about this site."""
        return {
            "name": self._node.name,
            "peer_id": self.peer_id,
            "n_train": self._node.n_train,
            "n_test": self._node.n_test,
            "rounds_trained": self.rounds_trained,
            **self._data_notes,
        }

    def deliver(self, envelope: bytes) -> None:
        for error in self.transport.failures():
            self.audit.record("send_failed", -1, "", {"error": error})
        try:
            opened = open_envelope(envelope, self.identity)
        except EnvelopeError as exc:
            self.audit.record("envelope_refused", -1, "", {"reason": type(exc).__name__})
            return
        h = opened.header
        if h.sender != self._coordinator:
            self.audit.record("unexpected_sender", h.round, h.message_id, {"type": h.type})
            return
        try:
            self._handle(h.type, h.round, opened.payload)
        except MediMeshError as exc:
            log.warning("message not handled", type=h.type, error=str(exc))
            self.audit.record("message_failed", h.round, h.message_id, {"error": str(exc)})
        self.maybe_flush()

    def _handle(self, type_: str, round_: int, payload: bytes) -> None:
        node = self._node
        if type_ == SetupRequest.TYPE:
            stats = node.on_setup_request(decode(type_, payload, SetupRequest))
            self.send(stats, [self._coordinator], 0)
        elif type_ == SetupResult.TYPE:
            node.on_setup_result(decode(type_, payload, SetupResult))
        elif type_ == RoundStart.TYPE:
            update = node.on_round_start(decode(type_, payload, RoundStart))
            self.post(update, [self._validator, self._coordinator], round_)
            self.rounds_trained += 1
        elif type_ == ModelPublished.TYPE:
            report = node.on_model(decode(type_, payload, ModelPublished))
            self.send(report, [self._coordinator], round_)
