"""Latency and memory measurements of ESC models across modes, runtimes and devices."""
