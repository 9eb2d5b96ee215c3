"""Transferability metrics: pure functions on arrays, one module per family."""
