"""Parallel runtime and training machinery. Knows nothing of model architecture."""
