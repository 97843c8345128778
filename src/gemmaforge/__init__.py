"""gemmaforge: faithful, hackable PyTorch for Gemma 3 / Gemma 4 / Mistral."""

__version__ = "0.1.0"
