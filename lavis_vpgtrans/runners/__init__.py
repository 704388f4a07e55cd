"""Runners registered with LAVIS."""
