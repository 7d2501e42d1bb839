"""The oracle's logic, without Ray or Serve: what the HTTP shell in ``medimesh.actors.oracle``
(and its ``oracle_*`` route modules) calls.

- :mod:`~medimesh.oracle.config` — :class:`OracleConfig`, where an oracle reads from.
- :mod:`~medimesh.oracle.requests` — the ``/diagnose`` body (pydantic models that say exactly
  what the engine accepts) and the 422 details the oracle answers with.
- :mod:`~medimesh.oracle.phenopacket_request` — the ``/diagnose/phenopacket`` body.
- :mod:`~medimesh.oracle.responses` — JSON shapes: audit entries, models, runs, rounds,
  baselines, ``/network``, ``/ready``.
- :mod:`~medimesh.oracle.vocabulary` — ``/vocabulary`` from the served model's feature spec.
- :mod:`~medimesh.oracle.serving` — which model may serve: the feature spec a stored model is
  read with, the vouching decision, the engine, refusal bookkeeping.
- :mod:`~medimesh.oracle.streams` — the ``/events`` Server-Sent-Events stream.
- :mod:`~medimesh.oracle.middleware` — the ASGI edge: access guard and body-size limit.
"""
