"""Mistral: config and model."""
