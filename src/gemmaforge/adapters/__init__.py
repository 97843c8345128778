"""Adapters applied from outside the model (LoRA)."""
