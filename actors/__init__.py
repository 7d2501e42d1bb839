"""Thin Ray shells around MediMesh's pure core (imported as ``medimesh.actors``)."""
