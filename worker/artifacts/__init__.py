"""Artifact layer: validates uploaded architectures, weights and datasets and loads them.

Modules: ``errors`` (ArtifactError), ``spec`` (declarative architectures), ``weights`` (safetensors
weights), ``datasets`` (safetensors / .npz / Parquet datasets). Nothing here unpickles or executes user
content, and nothing imports HTTP, database or queue code.
"""
