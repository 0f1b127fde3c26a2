"""Artifacts and models: captured at the call, uploaded by the engine's worker."""
