"""The DeepEyes agent loop: prompts, the zoom-in tool protocol and multi-turn trajectories."""
