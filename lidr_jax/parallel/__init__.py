"""Devices: meshes, logical-axis sharding rules, and multi-host process helpers."""
