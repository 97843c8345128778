"""What the model families share: config helpers, the forward context, the decoder base, hook points."""
