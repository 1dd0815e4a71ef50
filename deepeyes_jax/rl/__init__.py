"""Reinforcement learning: GRPO losses, sequence packing, the learner step, rewards and the LLM judge."""
