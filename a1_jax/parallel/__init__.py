"""Mesh construction, logical axis rules and sharding helpers."""
