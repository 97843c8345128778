"""Generation (KV cache, sampling)."""
