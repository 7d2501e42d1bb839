"""Synthetic, seeded rare-disease cohorts (HPO/Orphanet-grounded) for the MediMesh demo."""
