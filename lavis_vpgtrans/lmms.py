"""lavis-vpgtrans models in lmms-eval (issue 26): not yet implemented."""
