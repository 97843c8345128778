"""Autograd functions with hand-written backwards: the fused LM-head losses, the lean RMSNorm and gated MLP, grouped experts."""
