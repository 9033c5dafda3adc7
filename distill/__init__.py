"""Losses and objectives: vocab-parallel divergences, activation losses, teacher plumbing."""
