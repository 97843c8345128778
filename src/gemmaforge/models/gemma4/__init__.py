"""Gemma 4 (text decoder: dense, per-layer embeddings, KV sharing, MoE): config and model."""
