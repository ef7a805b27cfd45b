"""Verge: a self-hosted edge platform (CDN edge cache, streaming, edge compute)."""

__version__ = "0.1.0"
