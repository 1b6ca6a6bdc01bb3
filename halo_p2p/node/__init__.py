"""Composition roots: where concrete engines, links and sessions are wired together."""
