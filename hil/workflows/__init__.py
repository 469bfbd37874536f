"""Workflows over the run: bench, findings collection, debug, ci, nightly, pytest plugin."""
