"""Gemma 3 (text decoder): config and model."""
