"""Reinforcement-learning pieces: per-token log-probs of packed rollouts, policy losses, advantages."""
