"""Helpers that run inside the processes the distributed tests launch."""
