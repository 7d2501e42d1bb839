"""Standalone nodes: a hospital (or the operator's consortium) as its own OS process over AXL.

``medimesh node hospital`` runs one site with its own key, roster copy, spec, CSV and state
directory, never joining the consortium's Ray: it speaks only through an AXL node API
(:mod:`medimesh.node.hospital`). ``medimesh node consortium`` runs coordinator, validator and
auditor on the operator's Ray and serves the roster's hospitals through an AXL front
(:mod:`medimesh.node.consortium`). ``medimesh demo --sites processes`` plays every party on
one machine, each hospital its own process (:mod:`medimesh.node.processes`). Deployment
walkthrough: ``deploy/README.md``.
"""
