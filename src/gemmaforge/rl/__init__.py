"""Reinforcement-learning and preference pieces: per-token log-probs of packed rollouts, policy losses,
advantages, the DPO loss and preference pairs."""

from .dpo import dpo_loss

__all__ = ["dpo_loss"]
