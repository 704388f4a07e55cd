"""A memory plan before launch (issue 25): not yet implemented."""
