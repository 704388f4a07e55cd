"""Shared utilities: checkpoints, distributed setup, config, LAVIS fixes."""
