"""Observation: guest memory -> State (CR3-rooted walker, metadata decoder, registry reader)."""
