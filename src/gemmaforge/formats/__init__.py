"""Checkpoint formats, both ways: Hugging Face dirs, PEFT adapters, GGUF files, the embedded default."""
