"""Reinforcement learning: GRPO advantages and losses, sequence packing, the learner step, the warm start and the
training loop."""
